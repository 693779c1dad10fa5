"""Minimal HTTP/1.1 message framing for the proxy (pure helpers + stream copies).

Parses a request or response head; copies a body by Content-Length, chunked
coding, or until close. Enough for a forward proxy that inspects each request
line; it never buffers a whole body.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

MAX_HEAD = 64 * 1024

BODY_CHUNK = 256 * 1024
"""Bytes of a body read at once (and the origin reader's buffer, data_plane.origins). 64 KiB made a
10 MB download through the ZEN 154 MB/s, 256 KiB 347 MB/s (bench/zen_vs_mitmproxy.py, curl): the
reader paused and resumed its TLS transport every 128 KiB. A buffer fills only while the other side
is slower, so idle connections hold none of it."""


class HttpError(Exception):
    """A malformed or oversized HTTP message."""


@dataclass
class Head:
    start: list[str]  # request: method, target, version; response: version, status, reason
    headers: list[tuple[str, str]]
    raw: bytes
    _index: dict[str, str] | None = field(default=None, repr=False, compare=False)
    """Lowered name: first value (read_head builds it with the headers, in the same pass)."""
    _framing: list[tuple[str, str]] | None = field(default=None, repr=False, compare=False)
    """Every Transfer-Encoding and Content-Length header, names lowered (check_framing's)."""

    def get(self, name: str) -> str | None:
        """The first value of header ``name`` (any case)."""
        if self._index is None:
            self._index_headers()
            assert self._index is not None
        return self._index.get(name.lower())

    def framing(self) -> list[tuple[str, str]]:
        if self._framing is None:
            self._index_headers()
            assert self._framing is not None
        return self._framing

    def _index_headers(self) -> None:
        index: dict[str, str] = {}
        framing: list[tuple[str, str]] = []
        for k, v in self.headers:
            lk = k.lower()
            if lk in _FRAMING:
                framing.append((lk, v))
            if lk not in index:
                index[lk] = v
        self._index, self._framing = index, framing

    def wants_close(self) -> bool:
        c = (self.get("connection") or "").lower()
        return "close" in c or (self.start[0 if self.start[0].startswith("HTTP/") else 2] == "HTTP/1.0"
                                and "keep-alive" not in c)


_FRAMING = frozenset({"transfer-encoding", "content-length"})


class Deadline:
    """A time limit on each wait for a message head of one connection (``read_head``), with one
    timer for the connection instead of one per head: the timer, when it fires, compares the
    time with the deadline last set; past it, the waiting task is cancelled, and ``read_head``
    raises TimeoutError as ``asyncio.timeout`` would. For a task that reads heads one after the
    other (a keep-alive connection: two heads a request); ``close`` at its end."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self._at: float | None = None
        self._handle: asyncio.TimerHandle | None = None
        self.expired = False

    def start(self, seconds: float) -> None:
        self._at = self._loop.time() + seconds
        if self._handle is None:
            self._handle = self._loop.call_at(self._at, self._fire)

    def stop(self) -> None:
        self._at = None

    def _fire(self) -> None:
        self._handle = None
        if self._at is None:
            return
        if self._loop.time() < self._at:  # pushed back since: wait for that
            self._handle = self._loop.call_at(self._at, self._fire)
            return
        self.expired = True
        self.task.cancel()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


async def read_head(reader: asyncio.StreamReader, timeout: float = 60, deadline: Deadline | None = None
                    ) -> Head | None:
    """The next message head, or None on a clean EOF before any byte; TimeoutError after
    ``timeout`` seconds (kept by ``deadline``, if given: the same connection's)."""
    try:
        if deadline is None:
            async with asyncio.timeout(timeout):  # a timer, not a task per head as wait_for makes
                raw = await reader.readuntil(b"\r\n\r\n")
        else:
            deadline.start(timeout)
            try:
                raw = await reader.readuntil(b"\r\n\r\n")
            except asyncio.CancelledError:
                if deadline.expired and deadline.task.uncancel() == 0:
                    raise TimeoutError from None  # ours (another cancellation goes on as it is)
                raise
            finally:
                deadline.stop()
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
        raise HttpError("malformed start line")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        k, sep, v = line.partition(":")
        if not sep or not k or k != k.strip():
            raise HttpError("malformed header line")
        headers.append((k, v.strip()))
    head = Head(start + [""] * (3 - len(start)), headers, raw)
    head._index_headers()  # names lowered once, here: every later look-up uses the index
    return head


def check_framing(head: Head, *, is_request: bool) -> None:
    """Refuse a message whose body length two parsers could read differently (request smuggling,
    RFC 9112 section 6.3): Transfer-Encoding with Content-Length, a request whose last transfer
    coding is not chunked, several Content-Length values that differ, or one that is not a number.
    The ZEN frames a body exactly once; the origin must see the same framing."""
    framing = head.framing()
    te = [v for k, v in framing if k == "transfer-encoding"]
    cls = {v.strip() for k, v in framing if k == "content-length"}
    if te and cls:
        raise HttpError("a message with both Transfer-Encoding and Content-Length is refused (request smuggling)")
    if te and is_request and ",".join(te).split(",")[-1].strip().lower() != "chunked":
        raise HttpError("a request's last transfer coding must be chunked")
    if len(cls) > 1 or any(not v.isdigit() for v in cls):
        raise HttpError("Content-Length must be one number")


def chunk_size(line: bytes) -> int:
    """The size on a chunk's first line (``line`` as read, CRLF included): hex digits only, then
    optional whitespace and extensions. Anything else (a sign, "0x", "_", nothing at all) is an
    error, never a guess: the ZEN must frame a body exactly as the other side does."""
    size = line[:-2].split(b";", 1)[0].rstrip(b" \t")
    if not size or size.lstrip(b"0123456789abcdefABCDEF"):
        raise HttpError("bad chunk size")
    return int(size, 16)


def bodiless(head: Head) -> bool:
    """A request head that says no body follows."""
    return head.get("transfer-encoding") is None and (head.get("content-length") or "0") == "0"


async def copy_body(head: Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                    is_response: bool, request_method: str = "", before: bytes = b"") -> tuple[int, bool]:
    """Copy the body that follows ``head``. Returns (bytes, read_until_close). ``before``
    (the head itself) is written first, in the same write as the body's first bytes when
    they are already here (one TLS record and one send, not two)."""
    if is_response:
        status = int(head.start[1]) if head.start[1].isdigit() else 0
        if request_method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            if before:
                writer.write(before)
            return 0, False
    if before:
        cl = head.get("content-length")
        if cl is not None and cl.isdigit() and head.get("transfer-encoding") is None \
                and 0 < int(cl) <= len(getattr(reader, "_buffer", b"")):
            n = int(cl)  # the whole body is here already: head and body in one write
            writer.write(before + await reader.readexactly(n))
            await writer.drain()
            return n, False
        writer.write(before)
    te = (head.get("transfer-encoding") or "").lower()
    if "chunked" in te:
        n = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            size = chunk_size(line)  # checked before it goes on: the other side must not see another framing
            writer.write(line)
            if size == 0:
                while True:  # trailers, then the empty line
                    t = await reader.readuntil(b"\r\n")
                    writer.write(t)
                    if t == b"\r\n":
                        break
                await writer.drain()
                return n, False
            left = size
            while left:  # as it arrives: a chunk may be as large as a whole body
                data = await reader.read(min(left, BODY_CHUNK))
                if not data:
                    raise HttpError("connection closed in the middle of a chunk")
                writer.write(data)
                left -= len(data)
                await writer.drain()
            if await reader.readexactly(2) != b"\r\n":
                raise HttpError("a chunk not followed by CRLF")
            writer.write(b"\r\n")
            n += size
    cl = head.get("content-length")
    if cl is not None:
        if not cl.isdigit():
            raise HttpError("bad Content-Length")
        left = int(cl)
        total = left
        while left:
            chunk = await reader.read(min(left, BODY_CHUNK))
            if not chunk:
                raise HttpError("body shorter than Content-Length")
            writer.write(chunk)
            left -= len(chunk)
            await writer.drain()
        return total, False
    if not is_response:
        return 0, False
    n = 0
    while chunk := await reader.read(BODY_CHUNK):  # no length: the body ends with the connection
        writer.write(chunk)
        n += len(chunk)
        await writer.drain()
    return n, True


async def splice(a_r: asyncio.StreamReader, a_w: asyncio.StreamWriter, b_r: asyncio.StreamReader,
                 b_w: asyncio.StreamWriter) -> None:
    """Relay bytes both ways until both directions end (tunnels, h2 relay)."""
    async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while chunk := await r.read(BODY_CHUNK):
                w.write(chunk)
                await w.drain()
        with contextlib.suppress(Exception):
            w.write_eof()

    await asyncio.gather(pump(a_r, b_w), pump(b_r, a_w))


class BodyReader:
    """The body that follows ``head``, read chunk by chunk (for translation to HTTP/2, where the
    framing is the protocol's own): by Content-Length, chunked coding (trailers kept), or until
    the connection closes. ``read`` returns None at the end of the body."""

    def __init__(self, head: Head, reader: asyncio.StreamReader, *, is_response: bool,
                 request_method: str = "") -> None:
        self._reader = reader
        self.trailers: list[tuple[bytes, bytes]] = []
        self.until_close = False
        self._left = 0
        self._chunked = False
        self._done = False
        status = int(head.start[1]) if is_response and head.start[1].isdigit() else 0
        te = (head.get("transfer-encoding") or "").lower()
        cl = head.get("content-length")
        if is_response and (request_method == "HEAD" or status in (204, 304) or 100 <= status < 200):
            self._done = True
        elif "chunked" in te:
            self._chunked = True
        elif cl is not None:
            if not cl.isdigit():
                raise HttpError("bad Content-Length")
            self._left = int(cl)
            self._done = self._left == 0
        elif is_response:
            self.until_close = True
        else:
            self._done = True

    @property
    def done(self) -> bool:
        """The whole body has been read (the connection may carry another message)."""
        return self._done

    @property
    def empty(self) -> bool:
        """Known to have no body at all (no read needed)."""
        return self._done and not self._chunked

    async def read(self) -> bytes | None:
        try:
            return await self._read()
        except asyncio.IncompleteReadError:
            raise HttpError("connection closed in the middle of a chunked body") from None
        except asyncio.LimitOverrunError:
            raise HttpError("a chunk size or trailer line too long") from None

    async def _read(self) -> bytes | None:
        if self._done:
            return None
        if self.until_close:
            chunk = await self._reader.read(BODY_CHUNK)
            if not chunk:
                self._done = True
                return None
            return chunk
        if self._chunked:
            if self._left == 0:
                line = await self._reader.readuntil(b"\r\n")
                self._left = chunk_size(line)
                if self._left == 0:
                    size = 0
                    while (t := await self._reader.readuntil(b"\r\n")) != b"\r\n":
                        size += len(t)
                        if size > MAX_HEAD:
                            raise HttpError("trailers too large")
                        k, sep, v = t.decode("latin-1").partition(":")
                        if sep:
                            self.trailers.append((k.strip().lower().encode("latin-1"), v.strip().encode("latin-1")))
                    self._done = True
                    return None
            chunk = await self._reader.read(min(self._left, BODY_CHUNK))
            if not chunk:
                raise HttpError("connection closed in the middle of a chunk")
            self._left -= len(chunk)
            if self._left == 0 and await self._reader.readexactly(2) != b"\r\n":
                raise HttpError("a chunk not followed by CRLF")
            return chunk
        chunk = await self._reader.read(min(self._left, BODY_CHUNK))
        if not chunk:
            raise HttpError("body shorter than Content-Length")
        self._left -= len(chunk)
        self._done = self._left == 0
        return chunk
