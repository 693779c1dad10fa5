"""The ZEN's forward proxy: the I/O shell around policy.py, keys.py, mint.py.

Per client connection: read a request head; ``CONNECT host:port`` is decided
by the org's policy (intercept, tunnel, block, refuse); absolute-URI requests
are forwarded as plain HTTP with the same checks; ``GET /proxy.pac`` serves a
PAC file. Interception verifies the origin against the system trust store plus
configured roots (an untrusted origin gets a 502 page, never a silent trust),
completes the client's handshake with a minted leaf, and inspects every
HTTP/1.1 request inside the tunnel (logged; blocked URL prefixes get 403).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable

from common.ids import is_id
from common.policy import PatternSet
from data_plane import metrics, plain
from data_plane.clienthello import MAX_HELLO, ClientHello, NotTls, decide, needed, parse
from data_plane.config import resolved
from data_plane.h2conn import H2Endpoint
from data_plane.http1 import HttpError, read_head, splice
from data_plane.inspect import Session, serve_page_h2
from data_plane.keys import KeyManager, OrgKey
from data_plane.mint import Minter
from data_plane.policy import Action, connect_action, org_for
from data_plane.proxyauth import ProxyAuth, Verdict, basic_credentials
from data_plane.upstream import H1Upstream, H2Upstream, Upstream

log = logging.getLogger("keyward.zen")
access = logging.getLogger("keyward.zen.access")

CONNECT_TIMEOUT = 10.0


def page(status: int, reason: str, text: str, extra: str = "") -> bytes:
    body = (f"<!doctype html><title>{status} {reason}</title><h1>{reason}</h1><p>{text}</p>"
            "<p>keyward ZEN</p>\n").encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/html; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n").encode() + body


def _html(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class Proxy:
    def __init__(self, km: KeyManager, minter: Minter, origin_ctx: ssl.SSLContext, *,
                 origin_h1_ctx: ssl.SSLContext | None = None,
                 resolve: dict[str, str] | None = None, pac_proxies: list[str] | None = None,
                 auth: ProxyAuth | None = None) -> None:
        self.km = km
        self.minter = minter
        self.origin_ctx = origin_ctx
        self.origin_h1_ctx = origin_h1_ctx or origin_ctx
        self.resolve = resolve or {}
        self._resolve_names = PatternSet(tuple(self.resolve))
        self.pac_proxies = pac_proxies or []
        self.auth = auth or ProxyAuth()

    def _addr(self, host: str) -> str:
        return resolved(self.resolve, self._resolve_names, host) or host

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        try:
            await self._serve(reader, writer, str(peer[0]))
        except (HttpError, ValueError) as e:
            with contextlib.suppress(Exception):
                writer.write(page(400, "Bad Request", _html(str(e))))
                await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        except Exception:
            log.exception("connection failed")
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ip: str) -> None:
        while True:
            head = await read_head(reader)
            if head is None:
                return
            method, target = head.start[0], head.start[1]
            if method == "GET" and target == "/proxy.pac":
                body = self.pac().encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ns-proxy-autoconfig\r\n"
                             + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                await writer.drain()
                continue
            org = org_for(self.km.policies, ip)
            if org is None:
                # Not an org's network: a credential, checked; a name alone opens nothing.
                creds = basic_credentials(head.get("proxy-authorization"))
                verdict = Verdict.BAD
                if creds is not None:
                    policy = self.km.policies.get(creds[0])
                    if policy is None and is_id(creds[0]):  # the CA is asked about no name of another form
                        # An org this ZEN has not heard of: its policy from the CA (which refuses, and
                        # audits, unless this pool serves it); the lookup costs the source a token.
                        if not self.auth.take(ip):
                            verdict = Verdict.THROTTLED
                        else:
                            policy = await self.km.learn(creds[0])
                    if verdict is not Verdict.THROTTLED:
                        verdict = await self.auth.check(policy, creds[1], ip)
                    metrics.PROXY_AUTH.labels(verdict.value).inc()
                if verdict is Verdict.OK and creds is not None:
                    org = creds[0]
                elif verdict is Verdict.THROTTLED:
                    writer.write(page(429, "Too Many Requests",
                                      "Too many failed proxy authentications from this address; wait a minute.",
                                      "Retry-After: 60\r\n"))
                    await writer.drain()
                    return
                else:
                    why = ("This network belongs to no organization; authenticate as your organization "
                           "(user: the organization id, password: its proxy credential).") if creds is None else \
                        "The organization or its proxy credential was not accepted."
                    writer.write(page(407, "Proxy Authentication Required", why,
                                      'Proxy-Authenticate: Basic realm="keyward"\r\n'))
                    await writer.drain()
                    return
            metrics.CONNECTIONS.labels(org).inc()
            if method == "CONNECT":
                await self._connect(reader, writer, org, target)
                return
            if not target.startswith("http://"):
                writer.write(page(400, "Bad Request", "A proxy request needs CONNECT or an absolute http:// URI."))
                await writer.drain()
                return
            if not await plain.forward(reader, writer, org, head, self.km.policies[org], self._addr, self._failed):
                return

    def pac(self) -> str:
        proxies = "; ".join(f"PROXY {p}" for p in self.pac_proxies) or "DIRECT"
        return f'function FindProxyForURL(url, host) {{ return "{proxies}; DIRECT"; }}\n'

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, org: str,
                       target: str) -> None:
        """CONNECT, in mitmproxy's order: decide what can be decided on the CONNECT host (block,
        fail-closed, an unreachable origin: answered with a page), say 200, read the client's
        ClientHello from the socket without consuming it, decide on the name the leaf will carry
        (``clienthello.decide``: the SNI, else the CONNECT host), then verify the origin under
        that same name and mint the leaf for it."""
        host, _, port_s = target.rpartition(":")
        host = host.strip("[]").lower()
        if not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
            raise HttpError("CONNECT target must be host:port, with a port from 1 to 65535")
        port = int(port_s)
        policy = self.km.policies[org]
        first = connect_action(policy, host, have_key=True)
        key = None
        if first is Action.INTERCEPT:
            key = await self.km.signer_for(org)
            first = connect_action(policy, host, have_key=key is not None)
        if first is Action.BLOCK or first is Action.REFUSE:
            self._decided(org, host, port, None, first, host, f"policy for {host}",
                          **({} if first is Action.BLOCK else {"status": 503, "reason": "no key for the organization "
                                                                "and its policy is fail-closed"}))
            if first is Action.BLOCK:
                writer.write(page(403, "Forbidden", f"{_html(host)} is blocked by your organization's policy."))
            else:
                writer.write(page(503, "Service Unavailable",
                                  "Your organization's traffic cannot be inspected right now and its policy is "
                                  "fail-closed."))
            await writer.drain()
            return
        try:  # TCP to the CONNECT host's address; TLS comes once the name is known
            o_reader, o_writer = await asyncio.wait_for(asyncio.open_connection(self._addr(host), port),
                                                        CONNECT_TIMEOUT)
        except (TimeoutError, OSError) as e:
            self._failed(org, f"{host}:{port}", 502, f"cannot reach {host}: {str(e) or type(e).__name__}")
            writer.write(page(502, "Bad Gateway", f"cannot reach {_html(host)}: {_html(str(e))}"))
            await writer.drain()
            return
        try:
            await self._after_connect(reader, writer, o_reader, o_writer, org, host, port, first, key)
        finally:
            # Whatever happens from here on (a client that never completes its handshake, sends
            # no TLS at all, or hangs up), the origin connection goes with the client's.
            with contextlib.suppress(Exception):
                o_writer.close()

    def _decided(self, org: str, host: str, port: int, sni: str | None, action: Action, name: str, why: str,
                 **answer: object) -> None:
        metrics.DECISIONS.labels(org, {Action.INTERCEPT: "intercepted", Action.TUNNEL: "tunnelled",
                                       Action.BLOCK: "blocked", Action.REFUSE: "refused"}[action]).inc()
        access.info(json.dumps({"org": org, "connect": f"{host}:{port}", "sni": sni, "name": name,
                                "action": action.value, "why": why, **answer}))

    @staticmethod
    def _failed(org: str, target: str, status: int, reason: str) -> None:
        """The access line of a 502/503 page: the status and its reason."""
        access.info(json.dumps({"org": org, "connect": target, "status": status, "reason": reason}))

    async def _after_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                             o_reader: asyncio.StreamReader, o_writer: asyncio.StreamWriter, org: str, host: str,
                             port: int, first: Action, key: OrgKey | None) -> None:
        # Keep the ClientHello in the socket, for the TLS layer, while it is read for the decision.
        transport = writer.transport
        assert isinstance(transport, asyncio.Transport)  # a TCP connection's: it reads too
        transport.pause_reading()
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        try:
            if getattr(reader, "_buffer", b""):  # bytes sent before our 200: not a TLS client we can serve
                raise NotTls("data before the tunnel was established")
            hello = await self._client_hello(writer)
        except (NotTls, TimeoutError, OSError) as e:
            if first is Action.TUNNEL:  # a do-not-inspect host: whatever it speaks, tunnelled as before
                self._decided(org, host, port, None, first, host, f"policy for {host}; not TLS ({e})")
                transport.resume_reading()
                await self._splice(reader, writer, o_reader, o_writer)
            return
        policy = self.km.policies[org]
        verdicts = {host: first}
        if hello.sni and hello.sni != host:
            second = connect_action(policy, hello.sni, have_key=True)
            if second is Action.INTERCEPT and key is None:
                key = await self.km.signer_for(org)
            verdicts = {host: connect_action(policy, host, have_key=key is not None),
                        hello.sni: connect_action(policy, hello.sni, have_key=key is not None)}
        action, name, why = decide(host, hello.sni, verdicts)
        self._decided(org, host, port, hello.sni, action, name, why)
        if action is Action.TUNNEL:
            transport.resume_reading()
            await self._splice(reader, writer, o_reader, o_writer)
            return
        if action is not Action.INTERCEPT or key is None:
            return  # after the 200 there is no page to send in plaintext: the connection is closed
        # The origin, over the same TCP connection, must prove the name the leaf will carry. A client
        # that offered no h2 gets an HTTP/1.1 origin at once (no reconnect).
        origin_ctx = self.origin_ctx if "h2" in hello.alpn else self.origin_h1_ctx
        try:
            await asyncio.wait_for(o_writer.start_tls(origin_ctx, server_hostname=name), CONNECT_TIMEOUT)
        except ssl.SSLCertVerificationError as e:
            await self._tls_page(reader, writer, org, key, name, 502, "Bad Gateway",
                                 f"The certificate of {_html(name)} is not trusted "
                                 f"({_html(e.verify_message or str(e))}); the connection was refused.",
                                 hello.alpn)
            return
        except (TimeoutError, OSError, ssl.SSLError) as e:
            if origin_ctx is self.origin_h1_ctx and "no application protocol" in str(e).lower().replace("_", " "):
                # An HTTP/2-only origin refused the HTTP/1.1 client's protocol: reach it over HTTP/2
                # on a new connection, and translate (inspect.Session.serve_h1).
                await self._intercept_again(reader, writer, org, name, host, port, key, hello.alpn)
                return
            await self._tls_page(reader, writer, org, key, name, 502, "Bad Gateway",
                                 f"cannot reach {_html(name)}: {_html(str(e))}",
                                 hello.alpn)
            return
        await self._intercept(reader, writer, o_reader, o_writer, org, name, host, port, key, hello.alpn)

    async def _intercept_again(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, org: str,
                               name: str, host: str, port: int, key: OrgKey, client_alpn: tuple[str, ...]) -> None:
        try:
            o_reader, o_writer = await asyncio.wait_for(asyncio.open_connection(
                self._addr(host), port, ssl=self.origin_ctx, server_hostname=name, limit=64 * 1024), CONNECT_TIMEOUT)
        except (TimeoutError, OSError, ssl.SSLError) as e:
            await self._tls_page(reader, writer, org, key, name, 502, "Bad Gateway",
                                 f"cannot reach {_html(name)}: {_html(str(e))}",
                                 client_alpn)
            return
        try:
            await self._intercept(reader, writer, o_reader, o_writer, org, name, host, port, key, client_alpn)
        finally:
            o_writer.close()

    async def _client_hello(self, writer: asyncio.StreamWriter) -> ClientHello:
        """Peek at the client's ClientHello (MSG_PEEK: it stays for the TLS layer), waiting with
        SO_RCVLOWAT for as many bytes as its record headers announce (no polling)."""
        loop = asyncio.get_running_loop()
        sock = writer.get_extra_info("socket")
        # A duplicate descriptor of the same socket: the transport owns the original in the loop.
        dup = socket.socket(fileno=os.dup(sock.fileno()))
        dup.setblocking(False)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                want = 5
                while True:
                    dup.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, min(want, MAX_HELLO))
                    ready: asyncio.Future[None] = loop.create_future()

                    def wake(f: asyncio.Future[None] = ready) -> None:
                        if not f.done():
                            f.set_result(None)
                    loop.add_reader(dup.fileno(), wake)
                    try:
                        await ready
                    finally:
                        loop.remove_reader(dup.fileno())
                    buf = dup.recv(MAX_HELLO, socket.MSG_PEEK)
                    if not buf:
                        raise NotTls("the client closed the connection")
                    hello = parse(buf)
                    if hello is not None:
                        return hello
                    want = needed(buf)
        finally:
            with contextlib.suppress(OSError):
                dup.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            dup.close()

    async def _tls_page(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, org: str, key: OrgKey,
                        name: str, status: int, reason: str, text: str, client_alpn: tuple[str, ...]) -> None:
        """An error page the client can read: over TLS, with a leaf for the name it asked for, in
        the protocol it speaks (an HTTP/2-only client, gRPC's, could not read an HTTP/1.1 page)."""
        self._failed(org, name, status, html.unescape(text))
        alpn = ("h2", "http/1.1") if "h2" in client_alpn else ("http/1.1",)
        ctx = await asyncio.to_thread(self.minter.context_for, org, key.key_id, key.signer, key.certificate_pem,
                                      name, [], alpn, key.chain_pem)
        await writer.start_tls(ctx)
        c_ssl = writer.get_extra_info("ssl_object")
        if c_ssl is not None and c_ssl.selected_alpn_protocol() == "h2":
            await serve_page_h2(reader, writer, status, text)
            return
        writer.write(page(status, reason, text))
        await writer.drain()

    async def _intercept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         o_reader: asyncio.StreamReader, o_writer: asyncio.StreamWriter, org: str, name: str,
                         host: str, port: int, key: OrgKey, client_alpn: tuple[str, ...]) -> None:
        """Both handshakes done: every request is inspected (``inspect.Session``), in the protocol
        each side chose; HTTP/2 is offered to a client that offers it, whatever the origin speaks."""
        sslobj = o_writer.get_extra_info("ssl_object")
        peer = sslobj.getpeercert() if sslobj else None
        sans = [v for k, v in (peer or {}).get("subjectAltName", ()) if k in ("DNS", "IP Address")]
        origin_proto = (sslobj.selected_alpn_protocol() if sslobj else None) or "http/1.1"
        alpn = ("h2", "http/1.1") if "h2" in client_alpn else ("http/1.1",)
        ctx = await asyncio.to_thread(self.minter.context_for, org, key.key_id, key.signer, key.certificate_pem,
                                      name, sans, alpn, key.chain_pem)
        await writer.start_tls(ctx)
        c_ssl = writer.get_extra_info("ssl_object")
        client_proto = (c_ssl.selected_alpn_protocol() if c_ssl else None) or "http/1.1"
        session = Session(org, name, tuple(sans), lambda: self.km.policies.get(org), client_proto, origin_proto)
        if client_proto != "h2" and origin_proto != "h2":
            await session.serve_h1_raw(reader, writer, o_reader, o_writer)
            return

        def connect(ctx: ssl.SSLContext) -> Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]:
            async def open_() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
                return await asyncio.wait_for(asyncio.open_connection(
                    self._addr(host), port, ssl=ctx, server_hostname=name, limit=64 * 1024), CONNECT_TIMEOUT)
            return open_

        upstream: Upstream
        if origin_proto == "h2":
            ep = H2Endpoint(o_reader, o_writer, client_side=True)
            await ep.start()
            upstream = H2Upstream(ep, connect(self.origin_ctx))
        else:
            upstream = H1Upstream((o_reader, o_writer), connect(self.origin_h1_ctx))
        if client_proto == "h2":
            await session.serve_h2(reader, writer, upstream)
        else:
            await session.serve_h1(reader, writer, upstream)

    async def _splice(self, a_r: asyncio.StreamReader, a_w: asyncio.StreamWriter, b_r: asyncio.StreamReader,
                      b_w: asyncio.StreamWriter) -> None:
        await splice(a_r, a_w, b_r, b_w)
        b_w.close()


def origin_context(extra_roots_file: str, alpn: tuple[str, ...] = ("h2", "http/1.1")) -> ssl.SSLContext:
    """Verifies origins against the system store plus the extra roots."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if extra_roots_file:
        ctx.load_verify_locations(cafile=extra_roots_file)
    ctx.set_alpn_protocols(list(alpn))
    return ctx

