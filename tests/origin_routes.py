"""What the test origins answer (tests/origins.py): the routes, written once
against ``Exchange`` so HTTP/1.1 and HTTP/2 cannot drift apart."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs, urlsplit

H2, H1 = "h2", "http/1.1"
Headers = list[tuple[str, str]]
TEXT: Headers = [("content-type", "text/plain")]

# /big's body: 64 printable bytes repeated, so a mismatch is easy to locate.
PATTERN = b"keyward origin pattern 0123456789 abcdefghijklmnopqrstuvwxyzABC\n"
assert len(PATTERN) == 64


def pattern(offset: int, n: int) -> bytes:
    """Bytes ``offset .. offset+n`` of /big's body, generated on demand."""
    start = offset % len(PATTERN)
    reps = (start + n) // len(PATTERN) + 1
    return (PATTERN * reps)[start:start + n]


def big_body(n: int) -> bytes:
    """What ``GET /big?bytes=n`` returns."""
    return pattern(0, n)


class Exchange:
    """One request/response, whatever the protocol (h1 or h2 implement it)."""

    protocol: str

    def __init__(self, method: str, path: str, authority: str) -> None:
        self.method, self.path, self.authority = method, path, authority

    async def body(self) -> bytes:
        """The whole request body (waits for its end)."""
        raise NotImplementedError

    async def informational(self, status: int, headers: Headers) -> None:
        raise NotImplementedError

    async def start(self, status: int, headers: Headers, length: int | None) -> None:
        """Response headers; ``length`` None: unknown (h1: chunked)."""
        raise NotImplementedError

    async def writable(self) -> int:
        """How much may be sent now; waits until it is more than 0 (h2 flow control)."""
        raise NotImplementedError

    async def send(self, chunk: bytes) -> None:
        raise NotImplementedError

    async def end(self, trailers: Headers | None = None) -> None:
        raise NotImplementedError

    async def abort(self) -> None:
        """Break the response off: h2 RST_STREAM(INTERNAL_ERROR), h1 close mid-body."""
        raise NotImplementedError

    async def push(self, path: str) -> bool:
        """Server push of ``path`` if the protocol and client allow it."""
        return False

    def last_on_connection(self) -> None:
        """Before start(): this response ends the connection (h1: Connection: close)."""

    async def goaway(self) -> None:
        """After end(): h2 sends GOAWAY(NO_ERROR) and closes once streams finish."""


async def reply(ex: Exchange, status: int, body: bytes, headers: Headers = TEXT) -> None:
    await ex.start(status, headers, len(body))
    await ex.send(body)
    await ex.end()


async def route(ex: Exchange) -> None:
    url = urlsplit(ex.path)
    q = parse_qs(url.query)
    get = ex.method == "GET"
    if get and url.path == "/hello":
        await reply(ex, 200, f"hello from {ex.authority} {ex.path} over {ex.protocol}\n".encode())
    elif ex.method in ("POST", "PUT") and url.path == "/echo":
        body = await ex.body()
        await reply(ex, 200, body, [("content-type", "application/octet-stream"),
                                     ("x-request-bytes", str(len(body)))])
    elif get and url.path == "/big":
        n = int(q.get("bytes", ["0"])[0])
        await ex.start(200, [("content-type", "application/octet-stream")], n)
        sent = 0
        while sent < n:  # each chunk is made only once the window can take it
            k = min(await ex.writable(), n - sent)
            await ex.send(pattern(sent, k))
            sent += k
        await ex.end()
    elif get and url.path == "/slow":
        await asyncio.sleep(int(q.get("ms", ["0"])[0]) / 1000)
        await reply(ex, 200, b"slow done\n")
    elif get and url.path == "/trailers":
        await ex.start(200, [*TEXT, ("trailer", "x-checksum")], None)
        await ex.send(b"with trailers\n")
        await ex.end([("x-checksum", "abc123")])
    elif get and url.path == "/early-hints":
        await ex.informational(103, [("link", "</style.css>; rel=preload")])
        await reply(ex, 200, b"after hints\n")
    elif get and url.path == "/reset":
        await ex.start(200, TEXT, 100)  # promises 100 bytes, sends 8, then breaks off
        await ex.send(b"partial ")
        await ex.abort()
    elif get and url.path == "/goaway":
        ex.last_on_connection()
        await reply(ex, 200, b"bye\n")
        await ex.goaway()
    elif get and url.path == "/push":
        await ex.push("/pushed")
        await reply(ex, 200, b"push page\n")
    else:
        await reply(ex, 404, b"not found\n")

