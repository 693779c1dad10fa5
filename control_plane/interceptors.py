"""One identity rule for every method on the port, including the standard
Health and reflection services (keyward's own services check identity in
their call wrapper, where it is also audited); and one answer to a request
body that does not decode: INVALID_ARGUMENT, after the identity check (a
stranger learns nothing), logged at most once per interval with a count
(gRPC itself would answer UNKNOWN with a Python class name, before any
identity check, and log an ERROR each time)."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from control_plane.errors import Unauthenticated
from control_plane.identity import from_certificate

log = logging.getLogger("keyward.ca")
UNDECODABLE_LOG_EVERY = 10.0
"""Seconds between log lines about undecodable requests (each line carries the count)."""


class Undecodable:
    """What a request that does not decode becomes: the handler answers INVALID_ARGUMENT."""

    def __init__(self, method: str) -> None:
        self.method = method


class _Limiter:
    def __init__(self) -> None:
        self.last = 0.0
        self.skipped = 0

    def note(self, method: str) -> None:
        now = time.monotonic()
        if now - self.last >= UNDECODABLE_LOG_EVERY:
            log.warning("request body does not decode (%d more since the last line)", self.skipped,
                        extra={"method": method})
            self.last, self.skipped = now, 0
        else:
            self.skipped += 1


def _tolerant(method: str, deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def d(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception:  # noqa: BLE001 - any decoding failure is the caller's bad input
            return Undecodable(method)
    return d


class IdentityInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, trust_domain: str) -> None:
        self._td = trust_domain
        self._undecodable = _Limiter()

    def _refusal(self, context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
        pems = list(context.auth_context().get("x509_pem_cert") or [])
        if not pems:
            return "no client certificate"
        try:
            from_certificate(pems[0], trust_domain=self._td)
        except Unauthenticated as e:
            return str(e)
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        ours = method.startswith("/keyward.v1.")  # identity checked (and audited) by the service itself
        limiter = self._undecodable
        deserializer = _tolerant(method, handler.request_deserializer)

        def refusal(ctx: Any, req: Any) -> str | None:
            return None if ours and not isinstance(req, Undecodable) else self._refusal(ctx)

        async def check(req: Any, ctx: Any) -> None:
            why = refusal(ctx, req)
            if why:
                await ctx.abort(grpc.StatusCode.UNAUTHENTICATED, why)
            if isinstance(req, Undecodable):
                limiter.note(method)
                await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request body is not a valid {method.rsplit('/', 1)[-1]} request "
                                "(protobuf); send the message the API defines")

        async def _run(behavior: Any, req: Any, ctx: Any) -> AsyncIterator[Any]:
            await check(req, ctx)
            out = behavior(req, ctx)
            if inspect.isasyncgen(out):
                async for item in out:
                    yield item
            elif inspect.isawaitable(out):
                await out

        if handler.unary_unary:
            inner = handler.unary_unary

            async def uu(req: Any, ctx: Any) -> Any:
                await check(req, ctx)
                return await inner(req, ctx)

            return grpc.unary_unary_rpc_method_handler(
                uu, request_deserializer=deserializer,
                response_serializer=handler.response_serializer)
        # grpc.aio tells streaming handlers apart by being async generator functions.
        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def us(req: Any, ctx: Any) -> AsyncIterator[Any]:
                async for item in _run(inner_us, req, ctx):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                us, request_deserializer=deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_stream:  # reflection: its requests are checked one by one by its own code
            inner_ss = handler.stream_stream

            async def ss(it: Any, ctx: Any) -> AsyncIterator[Any]:
                async for item in _run(inner_ss, it, ctx):
                    yield item

            return grpc.stream_stream_rpc_method_handler(
                ss, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler
