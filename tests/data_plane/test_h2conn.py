"""data_plane.h2conn: the ZEN's HTTP/2 endpoint (client_side=False) against a hand-made h2 client.

In process, over a socketpair: no server, no subprocess. The client is ``h2`` driven step by step
(or raw bytes, for what ``h2`` refuses to send); the ZEN's endpoint runs its read loop as a task,
with handlers that the tests control. Every wait is bounded; no sleep is used to synchronise.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, GoAwayFrame

from data_plane import metrics
from data_plane.floods import BUDGETS, FloodGuard
from data_plane.h2conn import (
    CONN_WINDOW,
    MAX_HEADER_LIST,
    MAX_STREAMS,
    STREAM_WINDOW,
    STREAM_WINDOW_MAX,
    H2Endpoint,
    Inbound,
)
from data_plane.messages import Header

TIMEOUT = 10.0
Handler = Callable[[H2Endpoint, int, list[Header], Inbound], Coroutine[Any, Any, None]]


def _errors(kind: str) -> float:
    return metrics.REGISTRY.get_sample_value("keyward_zen_h2_errors_total", {"side": "client", "kind": kind}) or 0.0


class Client:
    """A hand-made HTTP/2 client: ``h2`` on the other end of the socketpair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.events: list[h2.events.Event] = []
        self.eof = False

    async def send(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_once(self) -> None:
        data = await self.reader.read(65536)
        if not data:
            self.eof = True
            raise EOFError("the ZEN closed the connection")
        for ev in self.conn.receive_data(data):
            self.events.append(ev)
            if isinstance(ev, h2.events.DataReceived) and ev.flow_controlled_length and ev.stream_id:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        with contextlib.suppress(ConnectionError):
            await self.send()

    async def until(self, match: Callable[[h2.events.Event], bool]) -> h2.events.Event:
        """The first event so far that ``match``es, reading more until one does."""
        async with asyncio.timeout(TIMEOUT):
            while True:
                for ev in self.events:
                    if match(ev):
                        return ev
                await self.read_once()

    async def handshake(self) -> None:
        self.conn.initiate_connection()
        await self.send()
        # The ZEN's SETTINGS, then its connection window opened to MAX_STREAMS stream windows.
        await self.until(lambda e: isinstance(e, h2.events.WindowUpdated) and e.stream_id == 0)

    async def goaway(self) -> h2.events.ConnectionTerminated:
        ev = await self.until(lambda e: isinstance(e, h2.events.ConnectionTerminated))
        assert isinstance(ev, h2.events.ConnectionTerminated)
        return ev

    async def request(self, path: str, *, end_stream: bool = True, method: str = "GET") -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, _req(path, method), end_stream=end_stream)
        await self.send()
        return sid

    async def response(self, sid: int) -> tuple[int, bytes]:
        await self.until(lambda e: isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)) and e.stream_id == sid)
        status = next(int(dict(e.headers or [])[b":status"]) for e in self.events
                      if isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid)
        body = b"".join(e.data or b"" for e in self.events if isinstance(e, h2.events.DataReceived)
                        and e.stream_id == sid)
        return status, body

    def got(self, kind: type[h2.events.Event], sid: int | None = None) -> list[h2.events.Event]:
        return [e for e in self.events if isinstance(e, kind) and (sid is None or getattr(e, "stream_id", None) == sid)]


def _req(path: str, method: str = "GET", *extra: Header) -> list[Header]:
    return [(b":method", method.encode()), (b":scheme", b"https"), (b":authority", b"shop.test"),
            (b":path", path.encode()), *extra]


async def _read_all(inbound: Inbound) -> bytes:
    out = bytearray()
    while (chunk := await inbound.read()) is not None:
        out += chunk
    return bytes(out)


async def answer(ep: H2Endpoint, sid: int, headers: list[Header], inbound: Inbound) -> None:
    """Reads the request body, answers 200 with its length."""
    body = await _read_all(inbound)
    await ep.send_headers(sid, [(b":status", b"200")])
    await ep.send_data(sid, b"%d bytes from %s" % (len(body), dict(headers)[b":path"]), end_stream=True)


async def hang(ep: H2Endpoint, sid: int, headers: list[Header], inbound: Inbound) -> None:
    """Never reads, never answers."""
    await asyncio.Event().wait()


class Zen:
    def __init__(self, ep: H2Endpoint, run: asyncio.Task[None], client: Client) -> None:
        self.ep, self.run, self.client = ep, run, client

    async def ended(self) -> None:
        """The endpoint's read loop is over (it ended the connection, or the client did)."""
        async with asyncio.timeout(TIMEOUT):
            await asyncio.shield(self.run)
        assert self.ep.closed


@contextlib.asynccontextmanager
async def zen(handler: Handler, guard: FloodGuard | None = None, handshake: bool = True) -> AsyncIterator[Zen]:
    a, b = socket.socketpair()
    s_reader, s_writer = await asyncio.open_connection(sock=a)
    c_reader, c_writer = await asyncio.open_connection(sock=b)
    ep = H2Endpoint(s_reader, s_writer, client_side=False, on_request=handler, guard=guard)
    await ep.start()
    run = asyncio.create_task(ep.run())
    client = Client(c_reader, c_writer)
    try:
        if handshake:
            await client.handshake()
        yield Zen(ep, run, client)
    finally:
        async with asyncio.timeout(TIMEOUT):
            await ep.close()
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run
            c_writer.close()
            with contextlib.suppress(ConnectionError):
                await c_writer.wait_closed()


# -- the harness itself


async def test_requests_are_answered_each_on_its_stream() -> None:
    async with zen(answer) as z:
        c = z.client
        get = await c.request("/a")
        post = await c.request("/upload", end_stream=False, method="POST")
        c.conn.send_data(post, b"x" * 1000, end_stream=True)
        await c.send()
        assert await c.response(get) == (200, b"0 bytes from /a")
        assert await c.response(post) == (200, b"1000 bytes from /upload")
        assert not c.got(h2.events.ConnectionTerminated)


# -- (1) flow control: a stream nobody reads holds one window, the others go on


async def test_a_stream_nobody_reads_holds_at_most_its_window_and_others_complete() -> None:
    go = asyncio.Event()

    async def handler(ep: H2Endpoint, sid: int, headers: list[Header], inbound: Inbound) -> None:
        if dict(headers)[b":path"] == b"/upload":
            await go.wait()  # nobody reads the body until the test says so
        await answer(ep, sid, headers, inbound)

    total = 1024 * 1024
    async with zen(handler) as z:
        c = z.client
        a = await c.request("/upload", end_stream=False, method="POST")
        sent = 0
        while (w := min(c.conn.local_flow_control_window(a), c.conn.max_outbound_frame_size, total - sent)) > 0:
            c.conn.send_data(a, b"x" * w)
            sent += w
        await c.send()
        assert sent == STREAM_WINDOW  # the ZEN's window for the stream, not the whole megabyte

        b = await c.request("/b")
        assert await c.response(b) == (200, b"0 bytes from /b")  # the stalled upload blocks no other stream
        # Frames are handled in order: all of A's DATA reached the endpoint before B's request did.
        held = z.ep.inbound[a]
        assert sum(len(d) for d, _ in held._chunks) == STREAM_WINDOW
        assert c.conn.local_flow_control_window(a) == 0
        assert not c.got(h2.events.WindowUpdated, a)  # nothing acknowledged what nobody read
        assert not c.got(h2.events.StreamEnded, a)

        go.set()  # now the handler reads: each chunk read is acknowledged, the upload goes on
        widest = 0
        async with asyncio.timeout(TIMEOUT):
            while sent < total:
                widest = max(widest, c.conn.local_flow_control_window(a))
                w = min(c.conn.local_flow_control_window(a), c.conn.max_outbound_frame_size, total - sent)
                if w <= 0:
                    await c.read_once()  # a WINDOW_UPDATE
                    continue
                c.conn.send_data(a, b"x" * w, end_stream=sent + w == total)
                sent += w
                await c.send()
        assert await c.response(a) == (200, b"%d bytes from /upload" % total)
        assert c.got(h2.events.WindowUpdated, a)
        # Read as it arrived, the stream had its window widened (to at most STREAM_WINDOW_MAX); ended,
        # it gives the widening back to the connection's budget.
        assert STREAM_WINDOW < widest <= STREAM_WINDOW_MAX
        assert z.ep._granted == MAX_STREAMS * STREAM_WINDOW <= CONN_WINDOW


async def test_a_client_ignoring_the_stream_window_ends_the_connection() -> None:
    async with zen(hang) as z:
        c = z.client
        sid = await c.request("/upload", end_stream=False, method="POST")
        frame = b"x" * 16384
        over = b"".join(struct.pack(">I", len(frame))[1:] + b"\x00\x00" + struct.pack(">I", sid) + frame
                        for _ in range(STREAM_WINDOW // len(frame) + 1))
        await c.raw(over)  # raw DATA frames: h2 would not send past the window
        ev = await c.goaway()
        assert ev.error_code == ErrorCodes.FLOW_CONTROL_ERROR
        await z.ended()


# -- (2) floods


async def test_a_ping_flood_past_its_burst_ends_the_connection_with_enhance_your_calm() -> None:
    burst = BUDGETS["ping"].burst
    before = _errors("flood")
    frozen = FloodGuard(clock=lambda: 0.0)  # no refill: exactly the burst is accepted
    async with zen(answer, guard=frozen) as z:
        c = z.client
        for i in range(burst):
            c.conn.ping(b"%08d" % i)
        await c.send()
        async with asyncio.timeout(TIMEOUT):
            while len(c.got(h2.events.PingAckReceived)) < burst:
                await c.read_once()
        assert not c.got(h2.events.ConnectionTerminated)
        assert not z.ep.closed
        assert _errors("flood") == before
        c.conn.ping(b"one-more")
        await c.send()
        ev = await c.goaway()
        assert ev.error_code == ErrorCodes.ENHANCE_YOUR_CALM and int(ev.error_code) == 0xB
        await z.ended()
        assert z.ep.error == "too many PING frames"
        assert _errors("flood") == before + 1


async def test_a_ping_flood_with_the_real_clock() -> None:
    before = _errors("flood")
    async with zen(answer) as z:
        c = z.client
        for i in range(2 * BUDGETS["ping"].burst):
            c.conn.ping(b"%08d" % i)
        await c.send()
        ev = await c.goaway()
        assert ev.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        await z.ended()
        assert _errors("flood") == before + 1


async def test_a_reset_flood_ends_the_connection() -> None:
    # CVE-2023-44487 (rapid reset): streams opened and reset at once.
    before = _errors("flood")
    started = 0

    async def count(ep: H2Endpoint, sid: int, headers: list[Header], inbound: Inbound) -> None:
        nonlocal started
        started += 1
        await asyncio.Event().wait()

    async with zen(count, guard=FloodGuard(clock=lambda: 0.0)) as z:
        c = z.client
        for _ in range(BUDGETS["reset"].burst + 1):
            sid = c.conn.get_next_available_stream_id()
            c.conn.send_headers(sid, _req("/"), end_stream=True)
            c.conn.reset_stream(sid, ErrorCodes.CANCEL)
        await c.send()
        ev = await c.goaway()
        assert ev.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        await z.ended()
        assert z.ep.error == "too many RST_STREAM frames"
        assert _errors("flood") == before + 1


@pytest.mark.parametrize("kind,frame,what", [
    ("ping", lambda i: _frame(0x6, 0, 0, struct.pack(">Q", i)), "PING"),
    ("settings", lambda i: _frame(0x4, 0, 0, b""), "SETTINGS"),
    ("priority", lambda i: _frame(0x2, 0, 2 * i + 101, b"\x00\x00\x00\x00\x10"), "PRIORITY"),
    ("empty_data", lambda i: _frame(0x0, 0, 1, b""), "empty DATA"),
])
async def test_every_budget_ends_the_connection_past_its_burst(kind: str, frame: Callable[[int], bytes],
                                                              what: str) -> None:
    before = _errors("flood")
    async with zen(hang, guard=FloodGuard(clock=lambda: 0.0)) as z:
        c = z.client
        await c.request("/upload", end_stream=False, method="POST")  # stream 1, for the empty DATA frames
        await c.raw(b"".join(frame(i) for i in range(BUDGETS[kind].burst + 1)))
        ev = await c.goaway()
        assert ev.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        await z.ended()
        assert z.ep.error == f"too many {what} frames"
        assert _errors("flood") == before + 1


async def test_a_handler_that_fails_resets_its_stream_only() -> None:
    async def handler(ep: H2Endpoint, sid: int, headers: list[Header], inbound: Inbound) -> None:
        if dict(headers)[b":path"] == b"/bug":
            raise RuntimeError("a bug in a handler")
        await answer(ep, sid, headers, inbound)

    async with zen(handler) as z:
        c = z.client
        bug = await c.request("/bug")
        ev = await c.until(lambda e: isinstance(e, h2.events.StreamReset) and e.stream_id == bug)
        assert isinstance(ev, h2.events.StreamReset) and ev.error_code == ErrorCodes.INTERNAL_ERROR
        ok = await c.request("/ok")
        assert await c.response(ok) == (200, b"0 bytes from /ok")


# -- (3) a header block over MAX_HEADER_LIST


async def test_a_header_block_over_the_limit_ends_the_connection() -> None:
    before = _errors("DenialOfServiceError")
    async with zen(answer) as z:
        c = z.client
        ok = c.conn.get_next_available_stream_id()  # just under the limit (32 bytes of overhead per field)
        c.conn.send_headers(ok, _req("/ok", "GET", (b"x-big", b"a" * (MAX_HEADER_LIST // 2))), end_stream=True)
        await c.send()
        assert (await c.response(ok))[0] == 200
        sid = c.conn.get_next_available_stream_id()
        c.conn.send_headers(sid, _req("/", "GET", (b"x-big", b"a" * (MAX_HEADER_LIST + 1))), end_stream=True)
        await c.send()
        ev = await c.goaway()
        # h2 raises DenialOfServiceError (hpack's OversizedHeaderListError): ENHANCE_YOUR_CALM.
        assert ev.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        assert ev.last_stream_id == ok
        await z.ended()
        assert z.ep.error is not None and z.ep.error.startswith("DenialOfServiceError")
        assert _errors("DenialOfServiceError") == before + 1


# -- (4) more than MAX_STREAMS concurrent streams


async def test_more_streams_than_allowed_end_the_connection() -> None:
    before = _errors("TooManyStreamsError")
    started: list[int] = []
    cancelled: list[int] = []
    all_started, all_cancelled = asyncio.Event(), asyncio.Event()

    async def count_and_hang(ep: H2Endpoint, sid: int, headers: list[Header], inbound: Inbound) -> None:
        started.append(sid)
        if len(started) == MAX_STREAMS:
            all_started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(sid)
            if len(cancelled) == MAX_STREAMS:
                all_cancelled.set()
            raise

    # No handshake: the client has not read the ZEN's SETTINGS, so its h2 lets it open more.
    async with zen(count_and_hang, handshake=False) as z:
        c = z.client
        c.conn.initiate_connection()
        for _ in range(MAX_STREAMS):
            await c.request("/")
        async with asyncio.timeout(TIMEOUT):
            await all_started.wait()
        assert not z.ep.closed  # exactly MAX_STREAMS at once is allowed
        await c.request("/one-too-many")
        ev = await c.goaway()
        assert ev.error_code == ErrorCodes.PROTOCOL_ERROR  # h2's TooManyStreamsError
        assert ev.last_stream_id == 2 * MAX_STREAMS - 1
        await z.ended()
        assert _errors("TooManyStreamsError") == before + 1
        async with asyncio.timeout(TIMEOUT):
            await all_cancelled.wait()  # the connection's end cancels every handler
        assert sorted(cancelled) == sorted(started)


# -- (5) invalid frames


def _frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


@pytest.mark.parametrize("garbage,code", [
    (_frame(0x0, 0, 0, b"x"), ErrorCodes.PROTOCOL_ERROR),                    # DATA on stream 0
    (_frame(0x1, 0x5, 2, b"\x82"), ErrorCodes.PROTOCOL_ERROR),               # HEADERS on an even stream
    (_frame(0x8, 0, 0, b"\x00\x00\x00\x00"), ErrorCodes.PROTOCOL_ERROR),     # WINDOW_UPDATE of 0
    (_frame(0x4, 0, 0, b"\x00"), ErrorCodes.FRAME_SIZE_ERROR),               # SETTINGS of 1 byte
    (_frame(0x0, 0, 1, b"x" * 16385), ErrorCodes.FRAME_SIZE_ERROR),         # a frame over 16 KiB
], ids=["data-on-stream-0", "headers-even-stream", "window-update-0", "settings-size", "oversized-frame"])
async def test_an_invalid_frame_ends_the_connection(garbage: bytes, code: ErrorCodes) -> None:
    async with zen(answer) as z:
        await z.client.raw(garbage)
        ev = await z.client.goaway()
        assert ev.error_code == code
        await z.ended()
        assert z.ep.error is not None


async def test_no_preface_ends_the_connection() -> None:
    # RFC 9113 3.4: an invalid preface is a connection error (PROTOCOL_ERROR) and "a GOAWAY frame MAY
    # be omitted": h2 raises without queuing one. The endpoint's loop ends; its caller closes the socket.
    async with zen(answer, handshake=False) as z:
        await z.client.raw(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        await z.ended()
        assert z.ep.error == "ProtocolError: Invalid HTTP/2 preamble."
        z.ep.writer.close()
        data = b""
        async with asyncio.timeout(TIMEOUT):
            while chunk := await z.client.reader.read(65536):
                data += chunk
        frames = []
        while data:
            frame, length = Frame.parse_frame_header(memoryview(data[:9]))
            frame.parse_body(memoryview(data[9:9 + length]))
            frames.append(frame)
            data = data[9 + length:]
        assert frames and not any(isinstance(f, GoAwayFrame) for f in frames)  # SETTINGS, WINDOW_UPDATE only


# -- (6) a client's RST_STREAM cancels that stream's handler only


async def test_a_reset_stream_cancels_its_handler_and_the_others_complete() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def handler(ep: H2Endpoint, sid: int, headers: list[Header], inbound: Inbound) -> None:
        if dict(headers)[b":path"] == b"/slow":
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
        await answer(ep, sid, headers, inbound)

    async with zen(handler) as z:
        c = z.client
        slow = await c.request("/slow")
        async with asyncio.timeout(TIMEOUT):
            await started.wait()
        task = z.ep._tasks[slow]
        c.conn.reset_stream(slow, ErrorCodes.CANCEL)
        await c.send()
        fast = await c.request("/fast")
        assert await c.response(fast) == (200, b"0 bytes from /fast")
        async with asyncio.timeout(TIMEOUT):
            await cancelled.wait()
            await task  # the stream's task ends (the cancellation is its normal end)
        assert slow not in z.ep._tasks and slow not in z.ep.inbound  # released
        assert not z.ep.closed and not c.got(h2.events.ConnectionTerminated)
        assert not c.got(h2.events.ResponseReceived, slow)
        again = await c.request("/again")  # the connection goes on
        assert await c.response(again) == (200, b"0 bytes from /again")


def test_a_received_frame_is_described_as_hyperframe_does_without_hexlifying_its_payload() -> None:
    """h2 builds ``repr(frame)`` for every frame it receives; hyperframe hexlified a DATA frame's
    whole payload for it (15% of the ZEN's CPU in an HTTP/2 download). The replacement gives the
    library's text, for every length, from the payload's first bytes."""
    import hyperframe.frame

    from data_plane import h2conn

    assert hyperframe.frame._raw_data_repr is h2conn._data_repr
    for n in [*range(0, 24), 8192, 1 << 20]:
        data = bytes((i * 7) % 256 for i in range(n))
        assert h2conn._data_repr(data) == h2conn._library_data_repr(data), n
    assert h2conn._data_repr(None) == h2conn._library_data_repr(None) == "None"
    frame = hyperframe.frame.DataFrame(1, data=b"\xab" * 16384)
    assert repr(frame).endswith("<hex:abababababababababab...>")
