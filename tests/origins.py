"""Local HTTPS origins for the HTTP/2 tests, usable with real clients.

``H2Origin`` serves HTTP/2 (the ``h2`` library, server side; this module)
and HTTP/1.1 (tests/origin_h1.py) on one TLS port, choosing by ALPN; the
routes are in tests/origin_routes.py. ``GrpcOrigin`` (tests/grpc_origin.py,
re-exported here) is a real grpcio server. Every route answers the same on
both protocols and names the protocol in its body, so a test through the ZEN
can tell what the origin actually spoke.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import Sequence
from pathlib import Path

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from hyperframe.frame import GoAwayFrame

from tests.aioserver import CLIENT_GONE, LoopServer, TlsStream, strict_alpn
from tests.grpc_origin import GrpcOrigin
from tests.origin_h1 import serve_h1
from tests.origin_routes import H1, H2, Exchange, Headers, big_body, pattern, reply, route

__all__ = ["H1", "H2", "GrpcOrigin", "H2Origin", "big_body", "pattern"]


class _H2Stream(Exchange):
    protocol = H2

    def __init__(self, c: _H2Conn, sid: int, headers: dict[str, str]) -> None:
        super().__init__(headers.get(":method", ""), headers.get(":path", ""),
                         headers.get(":authority", headers.get("host", "")))
        self.c, self.sid = c, sid
        self.data = bytearray()
        self.ended = asyncio.Event()

    async def body(self) -> bytes:
        await self.ended.wait()
        return bytes(self.data)

    async def informational(self, status: int, headers: Headers) -> None:
        self.c.conn.send_headers(self.sid, [(":status", str(status)), *headers])
        self.c.flush()

    async def start(self, status: int, headers: Headers, length: int | None) -> None:
        hs = [(":status", str(status)), *headers]
        if length is not None:
            hs.append(("content-length", str(length)))
        self.c.conn.send_headers(self.sid, hs)
        self.c.flush()

    async def writable(self) -> int:
        while True:
            n = min(self.c.conn.local_flow_control_window(self.sid), self.c.conn.max_outbound_frame_size)
            if n > 0:
                return n
            self.c.window.clear()  # no await between the check and the wait: no lost wake-up
            await self.c.window.wait()

    async def send(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            n = await self.writable()
            self.c.conn.send_data(self.sid, bytes(view[:n]))
            self.c.flush()
            view = view[n:]
            await self.c.tls.drain()

    async def end(self, trailers: Headers | None = None) -> None:
        if trailers:
            self.c.conn.send_headers(self.sid, trailers, end_stream=True)
        else:
            self.c.conn.end_stream(self.sid)
        self.c.flush()

    async def abort(self) -> None:
        self.c.conn.reset_stream(self.sid, ErrorCodes.INTERNAL_ERROR)
        self.c.flush()

    async def push(self, path: str) -> bool:
        origin = self.c.origin
        origin.pushes_attempted += 1
        if not self.c.conn.remote_settings.enable_push:
            return False
        pid = self.c.conn.get_next_available_stream_id()
        req = {":method": "GET", ":scheme": "https", ":authority": self.authority, ":path": path}
        self.c.conn.push_stream(self.sid, pid, list(req.items()))
        self.c.flush()
        origin.pushes_sent += 1
        self.c.start_stream(_H2Stream(self.c, pid, req), pushed=True)
        return True

    async def goaway(self) -> None:
        self.c.goaway()


class _H2Conn:
    """One HTTP/2 connection: a reader task feeding h2, a task per stream."""

    def __init__(self, origin: H2Origin, tls: TlsStream) -> None:
        self.origin, self.tls = origin, tls
        self.conn = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        self.streams: dict[int, _H2Stream] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.window = asyncio.Event()  # set whenever a send window may have opened
        self.done = asyncio.Event()
        self.goaway_last: int | None = None

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.tls.write(data)

    async def run(self) -> None:
        self.conn.initiate_connection()
        self.flush()
        reader = asyncio.get_running_loop().create_task(self._read())
        try:
            await self.done.wait()
            if not reader.done():
                # A lingering close, as real servers do: closing with the client's last frames
                # (WINDOW_UPDATE, SETTINGS ACK) unread makes the kernel send RST, and the client's
                # kernel may then drop the response's last bytes still unread on its side (seen as a
                # CANCEL of a completed stream after GOAWAY). Wait, bounded, for the client to close.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(reader), 2.0)
        finally:
            reader.cancel()
            for t in list(self.tasks.values()):
                t.cancel()
            await asyncio.gather(reader, *self.tasks.values(), return_exceptions=True)
            self.tls.close()

    async def _read(self) -> None:
        try:
            while data := await self.tls.reader.read(1 << 16):
                events = self.conn.receive_data(data)  # ProtocolError: h2 queued a GOAWAY
                for ev in events:
                    self._event(ev)
                self.flush()
        except (*CLIENT_GONE, ProtocolError):
            pass  # a client error h2 answered with GOAWAY, or the client left
        except Exception as e:
            self.origin.errors.append(f"h2 connection: {type(e).__name__}: {e}")
        finally:
            with contextlib.suppress(CLIENT_GONE):
                self.flush()
            self.done.set()

    def _event(self, ev: Event) -> None:
        if isinstance(ev, RequestReceived) and ev.stream_id is not None:
            if self.goaway_last is not None and ev.stream_id > self.goaway_last:
                self.conn.reset_stream(ev.stream_id, ErrorCodes.REFUSED_STREAM)  # never served
                return
            headers = {str(k): str(v) for k, v in ev.headers or ()}
            st = _H2Stream(self, ev.stream_id, headers)
            self.origin.record(H2, st.method, st.path)
            self.start_stream(st, pushed=False)
        elif isinstance(ev, DataReceived) and ev.stream_id is not None:
            if (target := self.streams.get(ev.stream_id)) is not None:
                target.data += ev.data or b""
            # Echo holds bodies in memory anyway: give the window straight back.
            self.conn.acknowledge_received_data(ev.flow_controlled_length or 0, ev.stream_id)
        elif isinstance(ev, StreamEnded) and ev.stream_id in self.streams:
            self.streams[ev.stream_id].ended.set()
        elif isinstance(ev, StreamReset) and ev.stream_id is not None:
            if (t := self.tasks.get(ev.stream_id)) is not None:
                t.cancel()
        elif isinstance(ev, (WindowUpdated, RemoteSettingsChanged)):
            self.window.set()
        elif isinstance(ev, ConnectionTerminated):
            self.done.set()

    def start_stream(self, st: _H2Stream, pushed: bool) -> None:
        self.streams[st.sid] = st
        task = asyncio.get_running_loop().create_task(self._serve(st, pushed))
        self.tasks[st.sid] = task
        task.add_done_callback(lambda _t: self._finished(st.sid))

    async def _serve(self, st: _H2Stream, pushed: bool) -> None:
        try:
            if pushed:
                await reply(st, 200, b"pushed\n")
            else:
                await route(st)
        except asyncio.CancelledError:
            pass
        except (*CLIENT_GONE, StreamClosedError, ProtocolError):
            pass  # the client reset the stream or left
        except Exception as e:
            self.origin.errors.append(f"h2 stream {st.sid}: {type(e).__name__}: {e}")

    def _finished(self, sid: int) -> None:
        self.tasks.pop(sid, None)
        self.streams.pop(sid, None)
        if self.goaway_last is not None and not self.tasks:
            self.done.set()  # draining after GOAWAY: the last stream is done

    def goaway(self) -> None:
        # h2's close_connection() would move its state machine to CLOSED and
        # forbid finishing the streams still running; a graceful GOAWAY is
        # written by hand and the connection closed once they are done.
        self.goaway_last = self.conn.highest_inbound_stream_id
        frame = GoAwayFrame(0)
        frame.last_stream_id = self.goaway_last
        frame.error_code = ErrorCodes.NO_ERROR
        self.flush()
        self.tls.write(frame.serialize())


class H2Origin(LoopServer):
    """An HTTPS origin on 127.0.0.1 (port 0) speaking HTTP/2 and HTTP/1.1.

    ``H2Origin(cert, key, alpn=("h2", "http/1.1"))``; attributes ``port``,
    ``alpn``, ``seen`` (``(protocol, method, path)`` per request served, in
    arrival order; protocol is ``"h2"`` or ``"http/1.1"``; path as sent,
    query included; server pushes are not in it), ``pushes_attempted`` (h2
    ``/push`` requests), ``pushes_sent`` (PUSH_PROMISEs actually sent: the
    client allowed push), ``errors`` (bugs of this server; should stay empty).
    ``stop()``, or use it as a context manager.

    ALPN picks the protocol, server preference first. A client that offers
    none of ``alpn`` fails the handshake with the TLS alert
    ``no_application_protocol`` (curl: exit 35, "tlsv1 alert no application
    protocol"): with ``alpn=("h2",)`` that is what an http/1.1-only client
    gets; ``alpn=("http/1.1",)`` is an h1-only origin. A client sending no
    ALPN at all gets HTTP/1.1, or HTTP/2 (prior knowledge) on an h2-only
    origin.

    Routes, identical on both protocols:
    ``GET /hello`` "hello from <host> <path> over <h2|http/1.1>\\n";
    ``POST|PUT /echo`` the request body back (any framing), header
    ``x-request-bytes``; ``GET /big?bytes=N`` N bytes of ``pattern()``,
    generated as the h2 window opens; ``GET /slow?ms=N`` "slow done\\n" after
    N ms; ``GET /trailers`` "with trailers\\n" + trailer ``x-checksum:
    abc123``; ``GET /early-hints`` 103 with ``link``, then "after hints\\n";
    ``GET /reset`` headers (content-length 100) and 8 bytes, then RST_STREAM
    INTERNAL_ERROR (h2) or a close without close_notify (h1); ``GET /goaway``
    "bye\\n", then GOAWAY(NO_ERROR, last stream = highest seen) and a close
    once running streams end; later streams are refused (REFUSED_STREAM,
    not in ``seen``); on h1 ``Connection: close``; ``GET /push`` pushes
    ``/pushed`` ("pushed\\n") if allowed, then "push page\\n"; else 404.
    """

    def __init__(self, cert: Path, key: Path, alpn: Sequence[str] = (H2, H1)) -> None:
        self.alpn = tuple(alpn)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # TLS 1.2+ by default, as h2 requires
        self.ctx.load_cert_chain(cert, key)
        strict_alpn(self.ctx, self.alpn)
        self.seen: list[tuple[str, str, str]] = []
        self._seen_lock = threading.Lock()
        self.pushes_attempted = 0
        self.pushes_sent = 0
        super().__init__("h2-origin")

    def record(self, protocol: str, method: str, path: str) -> None:
        with self._seen_lock:  # appended on the loop thread, read by the test's
            self.seen.append((protocol, method, path))

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls = TlsStream(self.ctx, reader, writer)
        await tls.handshake()
        proto = tls.alpn or (H1 if H1 in self.alpn else H2)
        try:
            if proto == H2:
                await _H2Conn(self, tls).run()
            else:
                await serve_h1(self.record, tls)
        finally:
            tls.close()

