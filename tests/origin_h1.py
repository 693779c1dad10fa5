"""The HTTP/1.1 side of H2Origin (tests/origins.py): Content-Length and
chunked bodies both ways, keep-alive, 100-continue, trailers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from tests.aioserver import TlsStream
from tests.origin_routes import H1, Exchange, Headers, route

_REASONS = {100: "Continue", 103: "Early Hints", 200: "OK", 400: "Bad Request", 404: "Not Found"}


class H1Exchange(Exchange):
    protocol = H1

    def __init__(self, tls: TlsStream, method: str, path: str, headers: dict[str, str],
                 body: bytes, keep_alive: bool) -> None:
        super().__init__(method, path, headers.get("host", ""))
        self.tls, self._body, self.keep_alive = tls, body, keep_alive
        self.chunked = False
        self.aborted = False

    def _head(self, status: int, headers: Headers) -> None:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", *(f"{k}: {v}" for k, v in headers)]
        self.tls.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    async def body(self) -> bytes:
        return self._body

    async def informational(self, status: int, headers: Headers) -> None:
        self._head(status, headers)

    async def start(self, status: int, headers: Headers, length: int | None) -> None:
        self.chunked = length is None
        hs = [*headers, ("transfer-encoding", "chunked") if self.chunked else ("content-length", str(length))]
        if not self.keep_alive:
            hs.append(("connection", "close"))
        self._head(status, hs)

    async def writable(self) -> int:
        await self.tls.drain()  # TCP backpressure stands in for flow control
        return 1 << 16

    async def send(self, chunk: bytes) -> None:
        self.tls.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if self.chunked else chunk)
        await self.tls.drain()

    async def end(self, trailers: Headers | None = None) -> None:
        if self.chunked:
            self.tls.write(b"0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in trailers or ()).encode() + b"\r\n")
        await self.tls.drain()

    async def abort(self) -> None:
        await self.tls.drain()
        self.aborted = True
        self.tls.close(notify=False)  # TCP FIN mid-body, no close_notify: a truncated response

    def last_on_connection(self) -> None:
        self.keep_alive = False


async def read_body(r: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size = int((await r.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await r.readuntil(b"\r\n") != b"\r\n":
                    pass  # request trailers: read and dropped
                return bytes(body)
            body += await r.readexactly(size)
            await r.readexactly(2)
    return await r.readexactly(int(headers.get("content-length", "0")))


async def serve_h1(record: Callable[[str, str, str], None], tls: TlsStream) -> None:
    """Requests on one connection until the client or a route closes it."""
    r = tls.reader
    while True:
        try:
            head = (await r.readuntil(b"\r\n\r\n")).decode("latin-1")
        except asyncio.IncompleteReadError:
            return  # the client closed between requests
        lines = head.split("\r\n")
        method, path, version = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        record(H1, method, path)
        if headers.get("expect", "").lower() == "100-continue":
            tls.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl would otherwise wait a second
        ex = H1Exchange(tls, method, path, headers, await read_body(r, headers), keep)
        await route(ex)
        if ex.aborted:
            return
        if not ex.keep_alive:
            tls.close()
            return

