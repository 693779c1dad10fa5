"""One HTTP/2 connection of the ZEN, either side of the proxy: the I/O shell around ``h2``.

``h2`` (sans-IO, as in mitmproxy) parses and builds frames; this module owns the socket and the
streams' buffers. Its contract:

- **Flow control both ways.** Received DATA is acknowledged (WINDOW_UPDATE) only when the other
  side of the proxy has taken it, so a stream holds at most its window. A stream starts with
  ``STREAM_WINDOW``; each read widens it by that much, up to ``STREAM_WINDOW_MAX``, while the
  connection's streams' windows sum to at most ``CONN_WINDOW``, the connection window: a
  connection holds at most ``CONN_WINDOW`` bytes in each direction, and a stream whose reader
  stalls never blocks the others (the connection window covers every stream's window).
  Sending waits for the peer's windows and for its stream limit.
- **Each request its own task** (server side): ``on_request(endpoint, stream_id, headers,
  inbound)``; a stream the client resets cancels its task.
- **Errors.** A connection error (invalid frames, more streams than allowed, header blocks
  over ``MAX_HEADER_LIST``, flow-control violations, floods past ``floods.BUDGETS``) ends the
  connection with GOAWAY and the error's code, counted in ``keyward_zen_h2_errors_total``.
  A stream's end by RST_STREAM reaches whoever reads or writes it as ``StreamReset(code)``.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import contextlib
import logging
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame
from h2.errors import ErrorCodes

from data_plane import metrics
from data_plane.floods import FloodGuard
from data_plane.h2streams import StreamReset, closed_as_reset, code_name

__all__ = ["H2Endpoint", "Inbound", "StreamReset", "code_name"]
from data_plane.messages import Header

log = logging.getLogger("keyward.zen")


def _data_repr(data: bytes | None) -> str:
    """hyperframe's ``_raw_data_repr``, the same text, made from the first 11 bytes only.

    h2 builds ``repr(frame)`` of every frame it receives, for a trace line nobody enables
    (``H2Connection._receive_frame``), and hyperframe hexlifies a DATA frame's whole payload
    to keep 20 characters of it: 15% of the ZEN's CPU in a 10 MB HTTP/2 download (py-spy).
    tests/data_plane/test_h2conn.py checks the text is hyperframe's for every length."""
    if not data:
        return "None"
    r = binascii.hexlify(data[:11]).decode("ascii")
    return "<hex:" + (r[:20] + "..." if len(r) > 20 else r) + ">"


_library_data_repr = hyperframe.frame._raw_data_repr
hyperframe.frame._raw_data_repr = _data_repr

STREAM_WINDOW = 65535
"""A new stream's window toward the ZEN (the protocol's default; SETTINGS_INITIAL_WINDOW_SIZE)."""
STREAM_WINDOW_MAX = 16 * STREAM_WINDOW
"""A stream whose reader keeps up has its window widened to at most this (~1 MiB)."""
MAX_STREAMS = 100
"""Concurrent streams a client may open (RFC 9113 recommends no fewer than 100)."""
CONN_WINDOW = 2 * MAX_STREAMS * STREAM_WINDOW
"""The connection's window and its streams' windows' sum at most: bytes buffered per connection
and direction (~12.5 MiB; all streams at ``STREAM_WINDOW`` take half)."""
READ_MAX = 262144
"""A read of a stream's body takes what has arrived up to this many bytes (more if one frame is)."""
MAX_HEADER_LIST = 65536
"""Bytes of decoded headers per block; a larger block ends the connection (ENHANCE_YOUR_CALM)."""
IDLE_SECONDS = 120.0
"""A connection with no open stream and no frame for this long is closed."""


class Inbound:
    """A stream's received body: chunks in arrival order, acknowledged to the peer as they are
    read (this is what keeps a stream within its window). ``read`` returns None at the end."""

    def __init__(self, ep: H2Endpoint, sid: int) -> None:
        self._ep, self._sid = ep, sid
        self._chunks: collections.deque[tuple[bytes, int]] = collections.deque()
        self._wake = asyncio.Event()
        self.ended = False
        self.empty = False
        self.error: StreamReset | None = None
        self.trailers: list[Header] = []

    def feed(self, data: bytes, flow: int) -> None:
        self._chunks.append((data, flow))
        self._wake.set()

    def end(self) -> None:
        self.ended = True
        self._wake.set()

    def fail(self, err: StreamReset) -> None:
        if not self.ended:
            self.error = err
        self._wake.set()

    def discard(self) -> None:
        """Nobody will read what is buffered: give its window back."""
        while self._chunks:
            self._ep.ack(self._sid, self._chunks.popleft()[1])

    async def read(self) -> bytes | None:
        while True:
            if self._chunks:  # what has arrived, up to READ_MAX, as one piece: one send on the other side
                data, flow = self._chunks.popleft()
                if self._chunks and len(data) < READ_MAX:
                    parts, size = [data], len(data)
                    while self._chunks and size < READ_MAX:
                        more, n = self._chunks.popleft()
                        parts.append(more)
                        size, flow = size + len(more), flow + n
                    data = b"".join(parts)
                self._ep.ack(self._sid, flow, widen=not self.ended)
                if data:
                    return data
                continue
            if self.error is not None:
                raise self.error
            if self.ended:
                return None
            self._wake.clear()
            await self._wake.wait()


class H2Endpoint:
    """An HTTP/2 connection: ``client_side=False`` toward a client (it serves requests),
    ``client_side=True`` toward an origin (it sends them)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, client_side: bool,
                 on_request: Callable[[H2Endpoint, int, list[Header], Inbound], Coroutine[Any, Any, None]] | None = None,
                 guard: FloodGuard | None = None) -> None:
        self.reader, self.writer = reader, writer
        self.side = "origin" if client_side else "client"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=client_side, header_encoding=None, validate_inbound_headers=True,
            normalize_inbound_headers=True, validate_outbound_headers=True, normalize_outbound_headers=True))
        self._on_request = on_request
        self._guard = guard or FloodGuard()
        self.inbound: dict[int, Inbound] = {}
        self.responses: dict[int, asyncio.Queue[tuple[str, list[Header]]]] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._windows: dict[int, int] = {}  # a read stream's window as widened
        self._granted = MAX_STREAMS * STREAM_WINDOW  # every stream's first window, then widenings
        self._changed = asyncio.Event()
        self._written: asyncio.Future[None] | None = None
        self.closed = False
        self.goaway = False
        self.error: str | None = None

    # -- set-up and the read loop

    async def start(self) -> None:
        settings: dict[h2.settings.SettingCodes, int] = {
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
        }
        if self.side == "origin":
            settings[h2.settings.SettingCodes.ENABLE_PUSH] = 0  # a push would bypass the URL policy
        self.conn.local_settings = h2.settings.Settings(client=self.side == "origin", initial_values=settings)
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONN_WINDOW - 65535)
        await self.flush()

    async def run(self) -> None:
        """Read and dispatch frames until the peer closes or breaks the protocol."""
        try:
            while not self.closed:
                idle = not self.inbound and not self.responses and not self._tasks
                data = await asyncio.wait_for(self.reader.read(65536), IDLE_SECONDS if idle else None)
                if not data:
                    break
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError as e:
                    metrics.H2_ERRORS.labels(self.side, type(e).__name__).inc()
                    self.error = f"{type(e).__name__}: {e}"
                    await self.flush()  # h2 has queued the GOAWAY with the error's code
                    break
                for ev in events:
                    if not self._dispatch(ev):
                        self.conn.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
                        await self.flush()
                        return
                await self.flush()
                if self.goaway and self.side == "client" and not self._tasks:
                    break
        except (TimeoutError, ConnectionError, OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            self._shut("connection closed")

    def _dispatch(self, ev: h2.events.Event) -> bool:
        if isinstance(ev, h2.events.RequestReceived) and self._on_request is not None:
            sid = ev.stream_id
            assert sid is not None and ev.headers is not None
            new = self.inbound[sid] = Inbound(self, sid)
            self._windows[sid] = STREAM_WINDOW
            new.empty = ev.stream_ended is not None
            task = asyncio.create_task(self._serve(sid, list(ev.headers), new))
            self._tasks[sid] = task
        elif isinstance(ev, (h2.events.ResponseReceived, h2.events.InformationalResponseReceived)):
            q = self.responses.get(ev.stream_id or 0)
            if q is not None and ev.headers is not None:
                q.put_nowait(("final" if isinstance(ev, h2.events.ResponseReceived) else "info", list(ev.headers)))
        elif isinstance(ev, h2.events.DataReceived):
            sid, flow = ev.stream_id or 0, ev.flow_controlled_length or 0
            if not ev.data and not ev.stream_ended and not self._guard.spend("empty_data"):
                return self._flood("empty DATA frames")
            found = self.inbound.get(sid)
            if found is None:
                self.ack(sid, flow)  # a stream nobody reads any more: its window goes back at once
            else:
                found.feed(ev.data or b"", flow)
        elif isinstance(ev, h2.events.TrailersReceived):
            found = self.inbound.get(ev.stream_id or 0)
            if found is not None:
                found.trailers = list(ev.headers or [])
        elif isinstance(ev, h2.events.StreamEnded):
            found = self.inbound.get(ev.stream_id or 0)
            if found is not None:
                found.end()
        elif isinstance(ev, h2.events.StreamReset):
            if ev.remote_reset and not self._guard.spend("reset"):
                return self._flood("RST_STREAM frames")
            self._fail(ev.stream_id or 0, StreamReset(int(ev.error_code or 0), side=self.side))
        elif isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            if isinstance(ev, h2.events.RemoteSettingsChanged) and not self._guard.spend("settings"):
                return self._flood("SETTINGS frames")
            self._wake()
        elif isinstance(ev, h2.events.PingReceived) and not self._guard.spend("ping"):
            return self._flood("PING frames")
        elif isinstance(ev, h2.events.PriorityUpdated) and not self._guard.spend("priority"):
            return self._flood("PRIORITY frames")
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = True
            last = ev.last_stream_id or 0
            for sid in list(self.inbound) + list(self.responses):
                if sid > last or ev.error_code:  # never processed (the peer said so): safe to retry
                    code = ErrorCodes.REFUSED_STREAM if sid > last else int(ev.error_code or 0)
                    self._fail(sid, StreamReset(code, "the peer closed the connection (GOAWAY)", self.side))
            self._wake()
        return True

    def _flood(self, what: str) -> bool:
        metrics.H2_ERRORS.labels(self.side, "flood").inc()
        self.error = f"too many {what}"
        return False

    def _fail(self, sid: int, err: StreamReset) -> None:
        inbound = self.inbound.get(sid)
        if inbound is not None:
            inbound.fail(err)
        q = self.responses.get(sid)
        if q is not None:
            q.put_nowait(("reset", [(b"code", str(err.code).encode())]))
        task = self._tasks.get(sid)
        if task is not None and self.side == "client":
            task.cancel()  # the client gave up on this request
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _shut(self, why: str) -> None:
        self.closed = True
        for sid in list(self.inbound) + list(self.responses):
            self._fail(sid, StreamReset(ErrorCodes.CANCEL, why, self.side))
        for task in self._tasks.values():
            task.cancel()
        self._wake()

    async def _serve(self, sid: int, headers: list[Header], inbound: Inbound) -> None:
        assert self._on_request is not None
        try:
            await self._on_request(self, sid, headers, inbound)
        except (StreamReset, asyncio.CancelledError, ConnectionError, OSError):
            pass
        except Exception:
            log.exception("HTTP/2 stream failed")
            self.reset(sid, ErrorCodes.INTERNAL_ERROR)
        finally:
            self.release(sid)
            self._tasks.pop(sid, None)
            if self.goaway and not self._tasks:
                self.writer.close()

    # -- sending

    async def flush(self) -> None:
        """Send what h2 has queued, once per turn of the event loop for all the connection's
        streams (one TLS record and one system call instead of one per frame), then wait
        while the socket's buffer is full."""
        await self._flush_nowait()
        await self.writer.drain()

    def _flush_nowait(self) -> asyncio.Future[None]:
        if self._written is None:
            self._written = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(self._write_out)
        return self._written

    def _write_out(self) -> None:
        done, self._written = self._written, None
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)
        if done is not None and not done.done():
            done.set_result(None)

    def ack(self, sid: int, flow: int, widen: bool = False) -> None:
        if flow and not self.closed:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.acknowledge_received_data(flow, sid)
                win = self._windows.get(sid) if widen else None
                if win is not None and win < STREAM_WINDOW_MAX and self._granted + STREAM_WINDOW <= CONN_WINDOW:
                    self.conn.increment_flow_control_window(STREAM_WINDOW, sid)  # it keeps up: widen
                    self._windows[sid], self._granted = win + STREAM_WINDOW, self._granted + STREAM_WINDOW
            self._flush_nowait()

    def release(self, sid: int) -> None:
        """The proxy is done with the stream: buffered data's window goes back, and a peer still
        sending a body it no longer needs is told to stop (RST_STREAM NO_ERROR, RFC 9113 8.1)."""
        inbound = self.inbound.pop(sid, None)
        self.responses.pop(sid, None)
        self._granted -= self._windows.pop(sid, STREAM_WINDOW) - STREAM_WINDOW
        if inbound is not None:
            inbound.discard()
        stream = self.conn.streams.get(sid)
        if stream is not None and not stream.closed:
            self.reset(sid, ErrorCodes.NO_ERROR if self.side == "client" else ErrorCodes.CANCEL)

    def reset(self, sid: int, code: int) -> None:
        if self.closed:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.reset_stream(sid, code)
        self._flush_nowait()

    async def open_stream(self, headers: list[Header], end_stream: bool) -> int:
        """Origin side: a new request stream, once the origin's stream limit allows one."""
        while self.conn.open_outbound_streams >= self.conn.remote_settings.max_concurrent_streams:
            if self.closed or self.goaway:
                raise StreamReset(ErrorCodes.REFUSED_STREAM, "the origin connection is closing", self.side)
            await self._changed.wait()
        if self.closed or self.goaway:
            raise StreamReset(ErrorCodes.REFUSED_STREAM, "the origin connection is closing", self.side)
        sid = self.conn.get_next_available_stream_id()
        self.inbound[sid] = Inbound(self, sid)
        self._windows[sid] = STREAM_WINDOW
        self.responses[sid] = asyncio.Queue()
        self.conn.send_headers(sid, headers, end_stream=end_stream)
        await self.flush()
        return sid

    async def send_headers(self, sid: int, headers: list[Header], end_stream: bool = False) -> None:
        self._check(sid)
        with closed_as_reset(self.side):
            self.conn.send_headers(sid, headers, end_stream=end_stream)
        await self.flush()

    async def send_data(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        with closed_as_reset(self.side):
            await self._send_data(sid, data, end_stream)

    async def _send_data(self, sid: int, data: bytes, end_stream: bool) -> None:
        view = memoryview(data)
        while True:
            self._check(sid)
            window = min(self.conn.local_flow_control_window(sid), len(view))
            if window <= 0 and view:
                await self._changed.wait()
                continue
            frame = self.conn.max_outbound_frame_size
            for off in range(0, window, frame):
                part = view[off:min(off + frame, window)]
                self.conn.send_data(sid, part.tobytes(), end_stream=end_stream and off + len(part) == len(view))
            view = view[window:]
            if not view and end_stream and not data:
                self.conn.end_stream(sid)
            await self.flush()
            if not view:
                return

    async def end_stream(self, sid: int, trailers: list[Header] | None = None) -> None:
        self._check(sid)
        with closed_as_reset(self.side):
            if trailers:
                self.conn.send_headers(sid, trailers, end_stream=True)
            else:
                self.conn.end_stream(sid)
        await self.flush()

    def _check(self, sid: int) -> None:
        if self.closed:
            raise StreamReset(ErrorCodes.CANCEL, "connection closed", self.side)
        inbound = self.inbound.get(sid)
        if inbound is not None and inbound.error is not None and self.side == "origin":
            raise inbound.error

    async def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                self.conn.close_connection()
                await asyncio.wait_for(self.flush(), 5)
        self._shut("closed by the ZEN")
        self.writer.close()
