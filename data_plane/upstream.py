"""The origin side of an intercepted connection, whatever protocol the origin accepted.

``exchange(request, body, on_info)`` is an async context manager yielding the final
``Response`` and its body; informational (1xx) responses go to ``on_info`` first, in order.
The caller reads the body to its end inside the block; leaving the block early abandons
the exchange (an HTTP/2 stream is reset with CANCEL, an HTTP/1.1 connection closed).

- ``H2Upstream``: every request a stream of one HTTP/2 connection; after the origin's
  GOAWAY, new requests go over a new connection (verified as the first was); at ``close`` a
  connection with no stream open goes to ``release`` (the origin pool), if given.
- ``H1Upstream``: one request at a time per HTTP/1.1 connection; up to ``H1_CONNECTIONS``
  connections per intercepted client connection (as browsers do per host), reused when an
  exchange ends cleanly; at ``close`` those idle go to ``release`` (the origin pool), if given.
  A connection that was used before (``reused``: pooled) and turns out closed before its first
  response begins is replaced once for a request without a body.

Failures before a response are ``UpstreamError`` (the client gets a 502 with the reason), or
``StreamReset`` from the origin's RST_STREAM (passed on to the client).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from h2.errors import ErrorCodes

from data_plane.h2conn import H2Endpoint, StreamReset
from data_plane.http1 import BodyReader, HttpError, read_head
from data_plane.messages import Header, MessageError, Request, Response, response_from_h1, response_from_h2

H1_CONNECTIONS = 6
"""HTTP/1.1 connections to the origin per client connection (what browsers open per host)."""

Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
OnInfo = Callable[[Response], Awaitable[None]]


class UpstreamError(Exception):
    """The origin could not be reached, or broke off the exchange before its response."""


class Body(Protocol):
    """A message body being received: ``read`` gives chunks, then None; ``trailers`` after."""

    trailers: list[Header]

    @property
    def empty(self) -> bool: ...

    async def read(self) -> bytes | None: ...


class Upstream(Protocol):
    def exchange(self, req: Request, body: Body, on_info: OnInfo) -> contextlib.AbstractAsyncContextManager[
            tuple[Response, Body]]: ...

    async def close(self) -> None: ...


class H2Upstream:
    def __init__(self, first: H2Endpoint, connect: Connect, running: asyncio.Task[None] | None = None,
                 release: Callable[[H2Endpoint, asyncio.Task[None]], None] | None = None) -> None:
        """``running``: the task already reading ``first`` (a pooled connection); ``release``:
        takes the connection at ``close`` when no stream is open on it (the origin pool)."""
        self._ep = first
        self._connect = connect
        self._release = release
        self._runs: set[asyncio.Task[None]] = set()
        self._run_of: dict[int, asyncio.Task[None]] = {}
        self._keep(first, running)

    def _keep(self, ep: H2Endpoint, task: asyncio.Task[None] | None = None) -> None:
        task = task or asyncio.create_task(ep.run())
        self._runs.add(task)
        self._run_of[id(ep)] = task
        task.add_done_callback(self._runs.discard)

    async def _endpoint(self) -> H2Endpoint:
        if self._ep.closed or self._ep.goaway:
            try:
                reader, writer = await self._connect()
            except (TimeoutError, OSError) as e:
                raise UpstreamError(f"cannot reach the origin again: {e}") from None
            sslobj = writer.get_extra_info("ssl_object")
            if sslobj is None or sslobj.selected_alpn_protocol() != "h2":
                writer.close()
                raise UpstreamError("the origin no longer accepts HTTP/2")
            self._ep = H2Endpoint(reader, writer, client_side=True)
            await self._ep.start()
            self._keep(self._ep)
        return self._ep

    @contextlib.asynccontextmanager
    async def exchange(self, req: Request, body: Body, on_info: OnInfo) -> AsyncIterator[tuple[Response, Body]]:
        ep = await self._endpoint()
        sid = await ep.open_stream(req.to_h2(), end_stream=body.empty)
        pump = None if body.empty else asyncio.create_task(self._pump(ep, sid, body))
        try:
            queue = ep.responses[sid]
            while True:
                kind, headers = await queue.get()
                if kind == "reset":
                    raise StreamReset(int(headers[0][1]), side="origin")
                try:
                    resp = response_from_h2(headers)
                except MessageError as e:
                    raise UpstreamError(str(e)) from None
                if kind == "final":
                    break
                await on_info(resp)
            yield resp, ep.inbound[sid]
        finally:
            if pump is not None:
                pump.cancel()
            ep.release(sid)

    @staticmethod
    async def _pump(ep: H2Endpoint, sid: int, body: Body) -> None:
        """The request body to the origin, as its windows allow (the client's stream is
        acknowledged as it goes, so the client sends no faster than the origin reads)."""
        try:
            while (chunk := await body.read()) is not None:
                await ep.send_data(sid, chunk)
            await ep.end_stream(sid, body.trailers or None)
        except StreamReset:
            pass  # the origin reset the stream (the response side says how), or the client did
        except (HttpError, ConnectionError, OSError):
            ep.reset(sid, ErrorCodes.CANCEL)  # the client's body broke off: the request is incomplete

    async def close(self) -> None:
        ep, task = self._ep, self._run_of.get(id(self._ep))
        if (self._release is not None and task is not None and not task.done() and not ep.closed and not ep.goaway
                and not ep.inbound and not ep.responses and ep.conn.open_outbound_streams == 0):
            self._runs.discard(task)  # it goes on reading the idle connection, in the pool
            self._release(ep, task)
        else:
            await ep.close()
        for task in list(self._runs):
            task.cancel()


Release = Callable[[asyncio.StreamReader, asyncio.StreamWriter], None]


class H1Upstream:
    def __init__(self, first: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None, connect: Connect,
                 release: Release | None = None, reused: set[asyncio.StreamWriter] | None = None) -> None:
        self._idle = [first] if first else []
        self._connect = connect
        self._release = release
        self._reused = reused or set()
        self._slots = asyncio.Semaphore(H1_CONNECTIONS)
        self._open: set[asyncio.StreamWriter] = {first[1]} if first else set()

    async def _new(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            reader, writer = await self._connect()
        except (TimeoutError, OSError) as e:
            raise UpstreamError(f"cannot open another connection to the origin: {e}") from None
        self._open.add(writer)
        return reader, writer

    @contextlib.asynccontextmanager
    async def exchange(self, req: Request, body: Body, on_info: OnInfo) -> AsyncIterator[tuple[Response, Body]]:
        async with self._slots:
            reader, writer = self._idle.pop() if self._idle else await self._new()
            reusable = False
            pump: asyncio.Task[None] | None = None
            try:
                chunked = not body.empty and req.content_length is None
                if body.empty and req.content_length is None and req.method in ("POST", "PUT", "PATCH"):
                    req = dataclasses.replace(req, headers=(*req.headers, (b"content-length", b"0")))
                writer.write(req.to_h1(chunked=chunked))
                pump = None if body.empty else asyncio.create_task(self._pump(writer, body, chunked))
                while True:
                    try:
                        head = await read_head(reader)
                    except ConnectionError:
                        if writer not in self._reused or not body.empty:
                            raise
                        head = None
                    if head is None and writer in self._reused and body.empty:
                        # Pooled, and closed by its origin meanwhile: the request again, on a new connection.
                        self._reused.discard(writer)
                        self._open.discard(writer)
                        writer.close()
                        reader, writer = await self._new()
                        writer.write(req.to_h1(chunked=chunked))
                        continue
                    if head is None:
                        raise UpstreamError("the origin closed the connection without a response")
                    self._reused.discard(writer)
                    try:
                        resp = response_from_h1(head)
                    except MessageError as e:
                        raise UpstreamError(str(e)) from None
                    if 100 <= resp.status < 200 and resp.status != 101:
                        await on_info(resp)
                        continue
                    break
                if resp.status == 101:
                    raise UpstreamError("the origin switched protocols (101), which the ZEN does not inspect")
                rbody = BodyReader(head, reader, is_response=True, request_method=req.method)
                yield resp, rbody
                reusable = (rbody.done and not rbody.until_close and not head.wants_close()
                            and (pump is None or (pump.done() and not pump.cancelled() and pump.exception() is None)))
            except HttpError as e:
                raise UpstreamError(f"the origin sent a malformed response: {e}") from None
            finally:
                if pump is not None and not pump.done():
                    pump.cancel()
                if reusable:
                    self._idle.append((reader, writer))
                else:
                    self._open.discard(writer)
                    writer.close()

    @staticmethod
    async def _pump(writer: asyncio.StreamWriter, body: Body, chunked: bool) -> None:
        while (chunk := await body.read()) is not None:
            writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            await writer.drain()
        if chunked:
            writer.write(b"0\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in body.trailers) + b"\r\n")
            await writer.drain()

    async def close(self) -> None:
        idle = {w: r for r, w in self._idle} if self._release else {}
        for writer in self._open:
            if writer in idle and self._release is not None:
                self._release(idle[writer], writer)
            else:
                writer.close()
        self._open.clear()
        self._idle.clear()
