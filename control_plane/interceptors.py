"""One identity rule for every method on the port, including the standard
Health and reflection services (keyward's own services check identity in
their call wrapper, where it is also audited)."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from control_plane.errors import Unauthenticated
from control_plane.identity import from_certificate


class IdentityInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, trust_domain: str) -> None:
        self._td = trust_domain

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
        if handler is None or details.method.startswith("/keyward.v1."):
            return handler
        refusal = self._refusal

        async def _run(behavior: Any, req: Any, ctx: Any) -> AsyncIterator[Any]:
            why = refusal(ctx)
            if why:
                await ctx.abort(grpc.StatusCode.UNAUTHENTICATED, why)
            out = behavior(req, ctx)
            if inspect.isasyncgen(out):
                async for item in out:
                    yield item
            elif inspect.isawaitable(out):
                await out

        if handler.unary_unary:
            inner = handler.unary_unary

            async def uu(req: Any, ctx: Any) -> Any:
                why = refusal(ctx)
                if why:
                    await ctx.abort(grpc.StatusCode.UNAUTHENTICATED, why)
                return await inner(req, ctx)

            return grpc.unary_unary_rpc_method_handler(
                uu, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        # grpc.aio tells streaming handlers apart by being async generator functions.
        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def us(req: Any, ctx: Any) -> AsyncIterator[Any]:
                async for item in _run(inner_us, req, ctx):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                us, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_stream:
            inner_ss = handler.stream_stream

            async def ss(it: Any, ctx: Any) -> AsyncIterator[Any]:
                async for item in _run(inner_ss, it, ctx):
                    yield item

            return grpc.stream_stream_rpc_method_handler(
                ss, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler
