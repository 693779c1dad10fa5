"""Every request inside an intercepted connection, whatever the two sides speak.

After both TLS handshakes the client side is HTTP/2 or HTTP/1.1, and so is the origin side;
a ``Session`` serves the client in its protocol and reaches the origin in the origin's
(``upstream``), translating where they differ. Each request is decided on its own
(``policy.request_verdict``: forward, 403 for a blocked host or URL prefix, 421 for a host
that needs a connection of its own), logged (org, method, host, path, status, bytes, the
stream id for HTTP/2) and counted in ``keyward_zen_requests_total``. A blocked HTTP/2 stream
gets its 403 while the connection's other streams go on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from h2.errors import ErrorCodes

from common.logs import log_fields
from data_plane import metrics
from data_plane.h2conn import H2Endpoint, Inbound, StreamReset, code_name
from data_plane.http1 import BodyReader, Deadline, HttpError, bodiless, check_framing, copy_body, read_head, splice
from data_plane.messages import (
    Header,
    MessageError,
    Request,
    Response,
    page_response,
    request_from_h1,
    request_from_h2,
    request_line,
)
from data_plane.policy import OrgPolicy, Verdict, request_verdict
from data_plane.upstream import Upstream, UpstreamError

access = logging.getLogger("keyward.zen.access")

Redial = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]

_PAGES = {Verdict.BLOCK: (403, "{url} is blocked by your organization's policy."),
          Verdict.MISDIRECTED: (421, "{host} needs a connection of its own; your browser retries it.")}


_REFUSED = {Verdict.BLOCK: {"blocked": True}, Verdict.MISDIRECTED: {"misdirected": True}}


def _html(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class Session:
    def __init__(self, org: str, name: str, names: tuple[str, ...], policy: Callable[[], OrgPolicy | None],
                 client_proto: str, origin_proto: str) -> None:
        self.org, self.name, self.names = org, name, names
        self._policy = policy
        self.client_proto, self.origin_proto = client_proto, origin_proto
        self._inflight: set[asyncio.Task[Any]] = set()
        """HTTP/2 requests being served (their tasks)."""

    def verdict(self, req: Request) -> Verdict:
        policy = self._policy()
        if policy is None:  # the org's policy is gone (key dropped): nothing more goes through
            return Verdict.BLOCK
        return request_verdict(policy, self.name, self.names, req.host, req.path)


    def refusal(self, verdict: Verdict, req: Request) -> tuple[Response, bytes]:
        status, text = _PAGES[verdict]
        return page_response(status, text.format(url=_html(req.host + req.path), host=_html(req.host)))

    def log(self, req: Request | None, status: int, nbytes: int, stream: int | None, **extra: Any) -> None:
        metrics.child(metrics.REQUESTS, self.org, str(status)).inc()
        line: dict[str, Any] = {"org": self.org, "method": req.method if req else None,
                                "host": req.host if req else self.name, "path": req.path if req else None,
                                "status": status, "bytes": nbytes, "protocol": self.client_proto}
        if self.origin_proto != self.client_proto:
            line["origin_protocol"] = self.origin_proto
        if stream is not None:
            line["stream"] = stream
        line.update(extra)
        log_fields(access, line)

    # -- HTTP/2 clients

    async def serve_h2(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        async def on_request(ep: H2Endpoint, sid: int, headers: list[Header], inbound: Inbound) -> None:
            await self._h2_request(ep, sid, headers, inbound, upstream)

        ep = H2Endpoint(reader, writer, client_side=False, on_request=on_request)
        try:
            await ep.start()
            await ep.run()
        finally:
            if ep.error:
                self.log(None, 0, 0, None, error=f"HTTP/2 connection error: {ep.error}")
            if self._inflight:  # cancelled with the connection: their origin streams are released as they end
                await asyncio.wait(list(self._inflight), timeout=1.0)
            await upstream.close()

    async def _h2_request(self, ep: H2Endpoint, sid: int, headers: list[Header], inbound: Inbound,
                          upstream: Upstream) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._inflight.add(task)
        try:
            await self._h2_exchange(ep, sid, headers, inbound, upstream)
        finally:
            self._inflight.discard(task)

    async def _h2_exchange(self, ep: H2Endpoint, sid: int, headers: list[Header], inbound: Inbound,
                           upstream: Upstream) -> None:
        try:
            req = request_from_h2(headers)
        except MessageError as e:
            ep.reset(sid, ErrorCodes.PROTOCOL_ERROR)
            self.log(None, 0, 0, sid, error=str(e))
            return
        verdict = self.verdict(req)
        if verdict is not Verdict.FORWARD:
            resp, page = self.refusal(verdict, req)
            await ep.send_headers(sid, resp.to_h2())
            await ep.send_data(sid, page, end_stream=True)
            self.log(req, resp.status, 0, sid, **_REFUSED[verdict])
            return

        async def on_info(info: Response) -> None:
            await ep.send_headers(sid, info.to_h2())

        status, n, started = 0, 0, False
        error: str | None = None
        try:
            async with upstream.exchange(req, inbound, on_info) as (resp, body):
                status = resp.status
                has_body = resp.has_body(req.method)
                await ep.send_headers(sid, resp.to_h2(), end_stream=not has_body)
                started = True
                if has_body:
                    while (chunk := await body.read()) is not None:
                        await ep.send_data(sid, chunk)
                        n += len(chunk)
                    await ep.end_stream(sid, body.trailers or None)
        except StreamReset as e:
            if e.side != "origin":
                error = "the client reset the stream"
                raise
            error = f"the origin reset the stream ({code_name(e.code)})"
            if not started and e.code != ErrorCodes.REFUSED_STREAM:
                status = await self._h2_page(ep, sid, 502, f"The origin reset the request ({code_name(e.code)}).")
            else:  # REFUSED_STREAM: never processed, the client may retry it
                ep.reset(sid, e.code)
        except (UpstreamError, HttpError) as e:
            error = str(e)
            if started:
                ep.reset(sid, ErrorCodes.INTERNAL_ERROR)
            else:
                status = await self._h2_page(ep, sid, 502, _html(str(e)))
        finally:
            self.log(req, status, n, sid, **({"error": error} if error else {}))

    async def _h2_page(self, ep: H2Endpoint, sid: int, status: int, text: str) -> int:
        resp, page = page_response(status, text)
        await ep.send_headers(sid, resp.to_h2())
        await ep.send_data(sid, page, end_stream=True)
        return status

    # -- HTTP/1.1 clients

    async def serve_h1(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream) -> None:
        """An HTTP/1.1 client, the origin reached through ``upstream`` (an HTTP/2 origin:
        each request a stream; the response re-framed, chunked when its length is unknown)."""
        try:
            while (head := await read_head(reader)) is not None:
                check_framing(head, is_request=True)
                req = request_from_h1(head, self.name)
                body = BodyReader(head, reader, is_response=False)
                if not await self._h1_request(writer, req, body, upstream) or head.wants_close() or not body.done:
                    return
        finally:
            await upstream.close()

    async def _h1_request(self, writer: asyncio.StreamWriter, req: Request, body: BodyReader,
                          upstream: Upstream) -> bool:
        verdict = self.verdict(req)
        if verdict is not Verdict.FORWARD:
            resp, page = self.refusal(verdict, req)
            writer.write(resp.to_h1(chunked=False) + page)
            await writer.drain()
            self.log(req, resp.status, 0, None, **_REFUSED[verdict])
            return False

        async def on_info(info: Response) -> None:
            writer.write(info.to_h1(chunked=False))
            await writer.drain()

        status, n, started = 0, 0, False
        try:
            async with upstream.exchange(req, body, on_info) as (resp, rbody):
                status = resp.status
                has_body = resp.has_body(req.method)
                chunked = has_body and resp.content_length is None
                writer.write(resp.to_h1(chunked=chunked))
                started = True
                while has_body and (chunk := await rbody.read()) is not None:
                    writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                    n += len(chunk)
                    await writer.drain()
                if chunked:
                    writer.write(b"0\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in rbody.trailers) + b"\r\n")
                await writer.drain()
        except (UpstreamError, StreamReset, HttpError) as e:
            if not started:
                resp, page = page_response(502, _html(str(e)))
                writer.write(resp.to_h1(chunked=False) + page)
                await writer.drain()
                status = 502
            self.log(req, status, n, None, error=str(e))
            return False
        self.log(req, status, n, None)
        return True

    async def serve_h1_raw(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter,
                           o_reader: asyncio.StreamReader, o_writer: asyncio.StreamWriter,
                           redial: Redial | None = None) -> bool:
        """HTTP/1.1 on both sides: heads parsed and decided, bytes copied as they are. True when
        the client left with the origin connection at a message boundary (every exchange complete,
        neither side asked to close): it may serve another client connection of the same key.

        ``redial``: the origin connection was used before (pooled). If its origin closed it before
        the first response began, a first request without a body goes again over the (new,
        verified) connection ``redial`` opens."""
        deadline = Deadline()  # the connection's: its heads are read one after the other
        try:
            return await self._relay_h1(c_reader, c_writer, o_reader, o_writer, redial, deadline)
        finally:
            deadline.close()

    async def _relay_h1(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter,
                        o_reader: asyncio.StreamReader, o_writer: asyncio.StreamWriter, redial: Redial | None,
                        deadline: Deadline) -> bool:
        while (head := await read_head(c_reader, deadline=deadline)) is not None:
            check_framing(head, is_request=True)
            req = request_line(head, self.name)
            verdict = self.verdict(req)
            if verdict is not Verdict.FORWARD:
                resp, page = self.refusal(verdict, req)
                c_writer.write(resp.to_h1(chunked=False) + page)
                await c_writer.drain()
                self.log(req, resp.status, 0, None, **_REFUSED[verdict])
                return False
            o_writer.write(head.raw)
            # The request body goes up while the answer is awaited: a client sending
            # "Expect: 100-continue" waits for the 100 before its body. None to send: no task.
            upload = None if bodiless(head) else asyncio.create_task(
                copy_body(head, c_reader, o_writer, is_response=False))
            try:
                while True:  # informational responses (100 Continue, 103 Early Hints) first, as they come
                    try:
                        resp_head = await read_head(o_reader, deadline=deadline)
                    except ConnectionError:
                        if redial is None or upload is not None:
                            raise
                        resp_head = None
                    if resp_head is None and redial is not None and upload is None:
                        o_reader, o_writer = await redial()
                        redial = None
                        o_writer.write(head.raw)
                        continue
                    redial = None
                    if resp_head is None:
                        return False
                    if not resp_head.start[1].startswith("1") or resp_head.start[1] == "101":
                        break
                    c_writer.write(resp_head.raw)
                status = resp_head.start[1]
                if status == "101":  # an upgrade (WebSocket) the request's decision allowed: relayed as is
                    c_writer.write(resp_head.raw)
                    self.log(req, 101, 0, None, upgraded=resp_head.get("upgrade") or "")
                    await splice(c_reader, c_writer, o_reader, o_writer)
                    return False
                n, closed = await copy_body(resp_head, o_reader, c_writer, is_response=True,
                                            request_method=req.method, before=resp_head.raw)
                self.log(req, int(status) if status.isdigit() else 0, n, None)
                if upload is not None:
                    if not upload.done():
                        return False  # answered before the request body ended: this connection cannot go on
                    upload.result()
            finally:
                if upload is not None:
                    upload.cancel()
            if closed or head.wants_close() or resp_head.wants_close():
                return False
        return True


async def serve_page_h2(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int, text: str) -> None:
    """An HTTP/2 client's connection that can only be refused (the origin failed before any
    request): every stream it opens gets the page, until it leaves (at most 30 s)."""
    resp, body = page_response(status, text)

    async def answer(ep: H2Endpoint, sid: int, headers: list[Header], inbound: Inbound) -> None:
        await ep.send_headers(sid, resp.to_h2())
        await ep.send_data(sid, body, end_stream=True)

    ep = H2Endpoint(reader, writer, client_side=False, on_request=answer)
    try:
        await ep.start()
        await asyncio.wait_for(ep.run(), 30)
    except (TimeoutError, ConnectionError, OSError):
        pass
    finally:
        await ep.close()
