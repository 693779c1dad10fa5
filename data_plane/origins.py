"""The origin side of intercepted connections: dialled, verified, and kept for reuse.

An intercepted connection costs the ZEN two TLS handshakes; the origin's (a TCP connect, a full
handshake, the origin's chain parsed and verified) is the larger part, and a client that opens
connection after connection to one site pays it each time. ``OriginPool`` keeps an origin
connection that its client left at a message boundary, idle, for the next client connection of
the same key, which then skips the TCP connect and the handshake. ``Sessions`` keeps the origin's
TLS session (its ticket) per key, offered when a new connection to that key must be made (clients
in parallel, after an idle close), so that handshake is a resumption: no chain sent, parsed and
verified again. ``Dialer`` makes, verifies, lends and takes back origin connections.

Contract:

* The key is (org, CONNECT host, port, name, h2 offered): the org whose client made the
  connection, the host and port the TCP connection went to, the name the origin's certificate was
  verified for (the SNI the ZEN sent), and whether the ZEN offered h2. A connection or a session
  is used only under exactly the key it was made for: never for another org, host, port or name.
* Every connection is verified when it is made (the chain and the name, by the TLS context);
  a pooled one keeps what its origin proved then (its certificate's names, for the leaf). A
  resumed handshake proves nothing new, so its certificate (kept in the session) is checked again
  (:func:`check_resumed`): it must still cover the name and be within its validity, or the
  connection is refused like an untrusted one. Sessions live ``session_seconds`` at most (and no
  longer than the origin's ticket says; 0: none kept).
* Only a connection its user gives back at a message boundary is kept: at most ``per_key`` per key
  and ``max_idle`` in all (the oldest goes first), each for ``idle_seconds`` at most. One the origin
  closed, or with bytes nobody asked for, is never handed out.
* ``forget(org)`` drops an org's connections and sessions (its key dropped, its access revoked).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ssl
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from common.policy import PatternSet
from data_plane import metrics
from data_plane.config import resolved
from data_plane.http1 import BODY_CHUNK
from data_plane.policy import cert_name_covers

Key = tuple[str, str, int, str, bool]
"""(org, CONNECT host, port, verified name, h2 offered)."""

_offer: contextvars.ContextVar[ssl.SSLSession | None] = contextvars.ContextVar("keyward_origin_session",
                                                                             default=None)


class OriginContext(ssl.SSLContext):
    """A client context that offers the session :func:`offering` names, if any, to the
    handshakes it starts (asyncio's ``start_tls`` and ``open_connection`` take no session)."""

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, server_side: bool = False,
                 server_hostname: str | bytes | None = None, session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        if session is None and not server_side:
            session = _offer.get()
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)


@contextlib.contextmanager
def offering(session: ssl.SSLSession | None) -> Iterator[None]:
    """Handshakes started by this task within the block (an OriginContext's) offer ``session``."""
    token = _offer.set(session)
    try:
        yield
    finally:
        _offer.reset(token)


def names_of(peer: dict[str, Any] | None) -> tuple[str, ...]:
    """The DNS names and IP addresses of a certificate (``SSLObject.getpeercert()``)."""
    return tuple(v for k, v in (peer or {}).get("subjectAltName", ()) if k in ("DNS", "IP Address"))


def check_resumed(peer: dict[str, Any] | None, name: str, now: float | None = None) -> bool:
    """Whether the certificate of a resumed session still proves ``name``: one of its names
    covers it (as the handshake's check did), and it is within its validity now."""
    if not peer:
        return False
    now = time.time() if now is None else now
    try:
        if not ssl.cert_time_to_seconds(str(peer["notBefore"])) <= now <= ssl.cert_time_to_seconds(
                str(peer["notAfter"])):
            return False
    except (KeyError, ValueError):
        return False
    host = name.lower().rstrip(".")
    return any(cert_name_covers(n, host) for n in names_of(peer))


@dataclass
class Idle:
    """A pooled connection: what the origin negotiated and proved when it was made."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    proto: str
    sans: tuple[str, ...]
    timer: asyncio.TimerHandle | None = None
    ep: Any = None
    """An HTTP/2 connection's endpoint (h2conn.H2Endpoint), its frames still read by ``task``."""
    task: asyncio.Task[None] | None = None

    def usable(self) -> bool:
        if self.ep is not None:  # HTTP/2: open, no GOAWAY, its reader still running
            return not (self.ep.closed or self.ep.goaway or self.writer.is_closing()
                        or self.task is None or self.task.done())
        return usable(self.reader, self.writer)

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.writer.close()


def usable(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Open both ways, nothing read that nobody asked for (an origin's 408 before it closes)."""
    return not (writer.is_closing() or reader.at_eof() or reader.exception() is not None
                or bool(getattr(reader, "_buffer", b"")))


class OriginPool:
    def __init__(self, *, max_idle: int = 256, per_key: int = 8, idle_seconds: float = 30.0) -> None:
        self._max, self._per_key, self._idle_s = max_idle, per_key, idle_seconds
        self._idle: OrderedDict[Key, list[Idle]] = OrderedDict()
        self._count = 0
        self._hosts: dict[tuple[str, str, int], int] = {}
        """(org, host, port) -> idle connections under any name: ``has_host`` without a scan."""

    @property
    def enabled(self) -> bool:
        return self._max > 0 and self._idle_s > 0

    def __len__(self) -> int:
        return self._count

    def has_host(self, org: str, host: str, port: int) -> bool:
        """Some connection of ``org`` to ``host:port`` is idle (under any name)."""
        return (org, host, port) in self._hosts

    def take(self, key: Key) -> Idle | None:
        """An idle connection made for exactly ``key``, the most recently used first; None."""
        conns = self._idle.get(key)
        while conns:
            c = conns.pop()
            self._gone(key)
            if c.timer is not None:
                c.timer.cancel()
            if c.usable():
                if not conns:
                    del self._idle[key]
                metrics.child(metrics.ORIGIN_CONNECTIONS, "reused").inc()
                return c
            c.close()
        self._idle.pop(key, None)
        return None

    def put(self, key: Key, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proto: str,
            sans: tuple[str, ...], ep: Any = None, task: asyncio.Task[None] | None = None) -> bool:
        """Keep a connection at a message boundary (HTTP/2: with no stream open, ``ep`` and the
        ``task`` reading it) for ``key``; False (and closed) when it is not kept."""
        idle = Idle(reader, writer, proto, sans, None, ep, task)
        if not self.enabled or not idle.usable():
            idle.close()
            return False
        conns = self._idle.setdefault(key, [])
        self._idle.move_to_end(key)
        if len(conns) >= self._per_key:
            self._drop(key, conns[0])
            conns = self._idle.setdefault(key, [])
        while self._count >= self._max:
            oldest_key, oldest = next(iter(self._idle.items()))
            self._drop(oldest_key, oldest[0])
        idle.timer = asyncio.get_running_loop().call_later(self._idle_s, self._expire, key, idle)
        self._idle.setdefault(key, []).append(idle)
        self._count += 1
        self._hosts[key[:3]] = self._hosts.get(key[:3], 0) + 1
        return True

    def _gone(self, key: Key) -> None:
        """One idle connection of ``key`` less (taken or dropped)."""
        self._count -= 1
        left = self._hosts.get(key[:3], 0) - 1
        if left > 0:
            self._hosts[key[:3]] = left
        else:
            self._hosts.pop(key[:3], None)

    def _drop(self, key: Key, c: Idle) -> None:
        conns = self._idle.get(key, [])
        if c in conns:
            conns.remove(c)
            self._gone(key)
            if c.timer is not None:
                c.timer.cancel()
            c.close()
        if not conns:
            self._idle.pop(key, None)

    def _expire(self, key: Key, c: Idle) -> None:
        c.timer = None
        self._drop(key, c)

    def forget(self, org: str) -> None:
        for key in [k for k in self._idle if k[0] == org]:
            for c in list(self._idle.get(key, [])):
                self._drop(key, c)

    def close(self) -> None:
        for key in list(self._idle):
            for c in list(self._idle.get(key, [])):
                self._drop(key, c)


class Sessions:
    """The origin's latest TLS session per key, for ``session_seconds`` at most; bounded (LRU).

    Python copies a session each time one is read from a connection or offered to one (which
    decodes its certificate again: as much CPU as a third of a full handshake), so a session is
    read from a connection only when none is kept for its key, or the one kept has been offered
    since (a resumed connection brings a fresh ticket)."""

    def __init__(self, *, seconds: float = 600.0, size: int = 4096) -> None:
        self._seconds, self._size = seconds, size
        self._s: OrderedDict[Key, list[Any]] = OrderedDict()
        """key -> [session, expiry (monotonic), offered since saved]"""

    def get(self, key: Key) -> ssl.SSLSession | None:
        hit = self._s.get(key)
        if hit is None:
            return None
        if hit[1] < time.monotonic():
            del self._s[key]
            return None
        hit[2] = True
        session: ssl.SSLSession = hit[0]
        return session

    def save(self, key: Key, sslobj: ssl.SSLObject | None) -> None:
        """The connection's session, if it can be resumed (a ticket, or a TLS 1.2 session id),
        unless the one kept for ``key`` is still fresh and unused."""
        if self._seconds <= 0 or sslobj is None:
            return
        old = self._s.get(key)
        if old is not None and not old[2] and old[1] >= time.monotonic():
            return
        s = sslobj.session
        if s is None or not (s.has_ticket or s.id):
            return
        self._s[key] = [s, time.monotonic() + min(self._seconds, max(0, s.timeout)), False]
        self._s.move_to_end(key)
        while len(self._s) > self._size:
            self._s.popitem(last=False)

    def drop(self, key: Key) -> None:
        self._s.pop(key, None)

    def forget(self, org: str) -> None:
        for k in [k for k in self._s if k[0] == org]:
            del self._s[k]


CONNECT_TIMEOUT = 10.0


@dataclass
class Origin:
    """The origin side of one intercepted client connection, which owns it until it is released."""

    key: Key
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    proto: str = "http/1.1"
    """What the origin chose by ALPN."""
    sans: tuple[str, ...] = ()
    """The names the origin's certificate proved (the leaf carries those that fit)."""
    reused: bool = False
    """Taken from the pool: it may turn out closed before its first response (then redialled)."""
    ep: Any = None
    """A pooled HTTP/2 connection's endpoint (reader and writer are then None), read by ``task``."""
    task: asyncio.Task[None] | None = None


class Dialer:
    """Origin connections: TCP to the CONNECT host's address, TLS verified under the name, the
    pool. ``ctx``/``h1_ctx``: contexts that verify origins, offering h2 and HTTP/1.1 or HTTP/1.1 only."""

    def __init__(self, ctx: ssl.SSLContext, h1_ctx: ssl.SSLContext, resolve: dict[str, str],
                 pool: OriginPool | None = None, sessions: Sessions | None = None) -> None:
        self.ctx, self.h1_ctx = ctx, h1_ctx
        self.resolve = resolve
        self._resolve_names = PatternSet(tuple(resolve))
        self.pool = pool if pool is not None else OriginPool(max_idle=0)
        self.sessions = sessions if sessions is not None else Sessions(seconds=0)

    def forget(self, org: str) -> None:
        self.pool.forget(org)
        self.sessions.forget(org)

    def addr(self, host: str) -> str:
        return resolved(self.resolve, self._resolve_names, host) or host

    async def tcp(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(asyncio.open_connection(self.addr(host), port, limit=BODY_CHUNK),
                                      CONNECT_TIMEOUT)

    def take(self, key: Key) -> Origin | None:
        idle = self.pool.take(key)
        if idle is None:
            return None
        if idle.ep is not None:
            return Origin(key, None, None, idle.proto, idle.sans, reused=True, ep=idle.ep, task=idle.task)
        return Origin(key, idle.reader, idle.writer, idle.proto, idle.sans, reused=True)

    async def handshake(self, o: Origin) -> None:
        """TLS over ``o``'s TCP connection, the origin verified under the key's name, or its session
        resumed and checked again (raises ssl.SSLCertVerificationError, ssl.SSLError, OSError,
        TimeoutError)."""
        assert o.writer is not None
        with offering(self.sessions.get(o.key)):
            await asyncio.wait_for(o.writer.start_tls(self.ctx if o.key[4] else self.h1_ctx,
                                                      server_hostname=o.key[3]), CONNECT_TIMEOUT)
        o.proto, o.sans = self._proved(o.key, o.writer)

    async def open(self, key: Key) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new connection for ``key``, TCP and TLS, verified as :meth:`handshake` does."""
        with offering(self.sessions.get(key)):
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                self.addr(key[1]), key[2], ssl=self.ctx if key[4] else self.h1_ctx, server_hostname=key[3],
                limit=BODY_CHUNK), CONNECT_TIMEOUT)
        try:
            self._proved(key, writer)
        except ssl.SSLError:
            writer.close()
            raise
        return reader, writer

    def _proved(self, key: Key, writer: asyncio.StreamWriter) -> tuple[str, tuple[str, ...]]:
        """(ALPN chosen, certificate names) of a connection just made; a resumed session's
        certificate checked again for the name (:func:`check_resumed`)."""
        sslobj = writer.get_extra_info("ssl_object")
        peer = sslobj.getpeercert() if sslobj else None
        if sslobj is not None and sslobj.session_reused:
            if not check_resumed(peer, key[3]):
                self.sessions.drop(key)
                e = ssl.SSLCertVerificationError(f"the resumed session's certificate does not prove {key[3]} now")
                e.verify_message = "certificate of the resumed session does not match the name, or has expired"
                raise e
            metrics.child(metrics.ORIGIN_CONNECTIONS, "resumed").inc()
        else:
            metrics.child(metrics.ORIGIN_CONNECTIONS, "new").inc()
        return (sslobj.selected_alpn_protocol() if sslobj else None) or "http/1.1", names_of(peer)

    def release(self, o: Origin, reusable: bool) -> None:
        """``o``'s connection leaves its client connection: kept in the pool when ``reusable``
        (at a message boundary), else closed."""
        if o.ep is not None:  # a pooled HTTP/2 connection its client never used
            if o.task is not None:
                o.task.cancel()
            o.ep.writer.close()
            o.ep = o.task = None
        if o.writer is None or o.reader is None:
            return
        reader, writer, o.reader, o.writer = o.reader, o.writer, None, None
        self.sessions.save(o.key, writer.get_extra_info("ssl_object"))
        if reusable:
            self.pool.put(o.key, reader, writer, o.proto, o.sans)
        else:
            writer.close()

    def give_back_h2(self, key: Key, ep: Any, task: asyncio.Task[None]) -> None:
        """An HTTP/2 connection with no stream open, its endpoint still read by ``task``."""
        sslobj = ep.writer.get_extra_info("ssl_object")
        self.sessions.save(key, sslobj)
        self.pool.put(key, ep.reader, ep.writer, "h2", names_of(sslobj.getpeercert() if sslobj else None), ep, task)

    def give_back(self, key: Key, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A connection at a message boundary made by :meth:`open` (the upstreams' extra ones)."""
        sslobj = writer.get_extra_info("ssl_object")
        self.sessions.save(key, sslobj)
        proto = (sslobj.selected_alpn_protocol() if sslobj else None) or "http/1.1"
        self.pool.put(key, reader, writer, proto, names_of(sslobj.getpeercert() if sslobj else None))
