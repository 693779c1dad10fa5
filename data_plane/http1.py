"""Minimal HTTP/1.1 message framing for the proxy (pure helpers + stream copies).

Parses a request or response head; copies a body by Content-Length, chunked
coding, or until close. Enough for a forward proxy that inspects each request
line; it never buffers a whole body.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

MAX_HEAD = 64 * 1024


class HttpError(Exception):
    """A malformed or oversized HTTP message."""


@dataclass
class Head:
    start: list[str]  # request: method, target, version; response: version, status, reason
    headers: list[tuple[str, str]]
    raw: bytes

    def get(self, name: str) -> str | None:
        n = name.lower()
        for k, v in self.headers:
            if k.lower() == n:
                return v
        return None

    def wants_close(self) -> bool:
        c = (self.get("connection") or "").lower()
        return "close" in c or (self.start[0 if self.start[0].startswith("HTTP/") else 2] == "HTTP/1.0"
                                and "keep-alive" not in c)


async def read_head(reader: asyncio.StreamReader, timeout: float = 60) -> Head | None:
    """The next message head, or None on a clean EOF before any byte."""
    try:
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise HttpError("connection closed in the middle of a message head") from None
    except asyncio.LimitOverrunError:
        raise HttpError("message head too large") from None
    if len(raw) > MAX_HEAD:
        raise HttpError("message head too large")
    lines = raw.decode("latin-1").split("\r\n")
    start = lines[0].split(" ", 2)
    if len(start) < 2:
        raise HttpError(f"malformed start line")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        k, sep, v = line.partition(":")
        if not sep or not k or k != k.strip():
            raise HttpError("malformed header line")
        headers.append((k, v.strip()))
    return Head(start + [""] * (3 - len(start)), headers, raw)


async def copy_body(head: Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                    is_response: bool, request_method: str = "") -> tuple[int, bool]:
    """Copy the body that follows ``head``. Returns (bytes, read_until_close)."""
    if is_response:
        status = int(head.start[1]) if head.start[1].isdigit() else 0
        if request_method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return 0, False
    te = (head.get("transfer-encoding") or "").lower()
    if "chunked" in te:
        n = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            writer.write(line)
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    t = await reader.readuntil(b"\r\n")
                    writer.write(t)
                    if t == b"\r\n":
                        break
                await writer.drain()
                return n, False
            data = await reader.readexactly(size + 2)
            writer.write(data)
            n += size
            await writer.drain()
    cl = head.get("content-length")
    if cl is not None:
        if not cl.isdigit():
            raise HttpError("bad Content-Length")
        left = int(cl)
        total = left
        while left:
            chunk = await reader.read(min(left, 65536))
            if not chunk:
                raise HttpError("body shorter than Content-Length")
            writer.write(chunk)
            left -= len(chunk)
            await writer.drain()
        return total, False
    if not is_response:
        return 0, False
    n = 0
    while chunk := await reader.read(65536):  # no length: the body ends with the connection
        writer.write(chunk)
        n += len(chunk)
        await writer.drain()
    return n, True


async def splice(a_r: asyncio.StreamReader, a_w: asyncio.StreamWriter, b_r: asyncio.StreamReader,
                 b_w: asyncio.StreamWriter) -> None:
    """Relay bytes both ways until both directions end (tunnels, h2 relay)."""
    async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while chunk := await r.read(65536):
                w.write(chunk)
                await w.drain()
        with contextlib.suppress(Exception):
            w.write_eof()

    await asyncio.gather(pump(a_r, b_w), pump(b_r, a_w))
