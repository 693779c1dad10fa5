"""The CA's call wrapper: one for unary and streaming calls alike.

Every keyward method goes through :func:`rpc`, which

* identifies the caller from its mTLS certificate (the handler receives the
  :class:`~control_plane.identity.Identity`);
* for a write (``audited=True``), holds one of the identity's
  :data:`MAX_CONCURRENT_WRITES` slots and a token of its write rate;
* for a unary call, caps the deadline at the server's (``max_call_seconds``)
  and shares it with the store (:data:`control_plane.deadline.CALL_DEADLINE`);
  a stream bounds itself (WatchKeys ends after ``max_stream_seconds``);
* maps :mod:`control_plane.errors` to status codes in :data:`STATUS` (the one
  table), with their message; anything else becomes INTERNAL with a reference
  id that is also in the log line carrying the traceback, and never the
  exception's text (it may hold what a caller must not see);
* counts every call by method and code (``keyward_ca_rpcs_total``) and times
  it (``keyward_ca_rpc_duration_seconds``; a stream: its whole life). A call
  the client cancelled is counted as CANCELLED;
* logs each refusal, and audits failed writes and every PERMISSION_DENIED or
  UNAUTHENTICATED, at a bounded rate per caller (:mod:`control_plane.refusals`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from common import failpoints
from control_plane import metrics, refusals
from control_plane.deadline import CALL_DEADLINE
from control_plane.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    KeywardError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from control_plane.identity import Identity, check_id, describe_certificate, from_certificate
from control_plane.limits import Rate, Slots
from control_plane.store import Actor, Store

log = logging.getLogger("keyward.ca")

STATUS: dict[type[KeywardError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Aborted: grpc.StatusCode.ABORTED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_of(err: KeywardError) -> grpc.StatusCode:
    for cls in type(err).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


MAX_CONCURRENT_WRITES = 2
"""Admin writes one identity may have in flight at once: one org admin's burst of writes cannot
occupy the CA (or its write lock) that every tenant shares."""

_writes = Slots("writes", MAX_CONCURRENT_WRITES, "retry when one has finished")
_write_rate = Rate("Admin writes", 5.0, 20)
"""Every write holds the CA's write lock (the audit chain) through synchronous replication, which
every tenant's audited calls share: one identity may not take more than its share of it."""


class Servicer:
    """What the wrapper needs of a servicer: the store, the trust domain, the deadline cap."""

    def __init__(self, store: Store, trust_domain: str, max_call_seconds: float) -> None:
        self.store = store
        self.trust_domain = trust_domain
        self.max_call_seconds = max_call_seconds

    def identify(self, context: grpc.aio.ServicerContext[Any, Any]) -> Identity:
        auth = context.auth_context()
        pems = list(auth.get("x509_pem_cert") or [])
        if not pems:
            raise Unauthenticated("no client certificate: every call needs mTLS with a keyward identity")
        return from_certificate(pems[0], trust_domain=self.trust_domain)

    def budget(self, context: grpc.aio.ServicerContext[Any, Any]) -> float:
        remaining = context.time_remaining()
        if remaining is None:
            return self.max_call_seconds
        return max(0.0, min(remaining, self.max_call_seconds))


Ctx = grpc.aio.ServicerContext[Any, Any]


class _Call:
    """One call's bookkeeping, the same for unary calls and streams."""

    def __init__(self, svc: Servicer, action: str, audited: bool, stream: bool, request: Any,
                 context: Ctx) -> None:
        self.svc, self.action, self.audited, self.stream = svc, action, audited, stream
        self.request, self.context = request, context
        self.start = time.monotonic()
        self.ident: Identity | None = None
        self.held = ""
        self.deadline = False
        self.code = grpc.StatusCode.OK
        self.message = ""
        self.org_id = ""

    def begin(self) -> Identity:
        self.ident = self.svc.identify(self.context)
        if self.audited:  # a write: at most MAX_CONCURRENT_WRITES at once per identity, at a bounded rate
            self.held = _writes.take(self.ident.spiffe_id)
            _write_rate.take(self.ident.spiffe_id, time.monotonic())
        return self.ident

    def failed(self, e: BaseException) -> bool:
        """Record why the call failed; False when it must propagate (the client went away)."""
        if isinstance(e, KeywardError):
            self.code, self.message, self.org_id = status_of(e), str(e)[:1000], e.org_id
            if isinstance(e, Unavailable):
                metrics.DB_ERRORS.inc()
        elif isinstance(e, TimeoutError) and self.deadline:
            self.code = grpc.StatusCode.DEADLINE_EXCEEDED
            self.message = f"{self.action} did not finish within its deadline (server cap {self.svc.max_call_seconds:g}s)"
        elif isinstance(e, Exception):
            ref = uuid.uuid4().hex[:12]
            log.exception("unexpected error in %s (ref %s)", self.action, ref, extra={"method": self.action})
            self.code = grpc.StatusCode.INTERNAL
            self.message = f"internal error (ref {ref}); " + (
                "the stream ended" if self.stream else "the request was not applied")
        else:  # cancelled by the client (or the server stopping): nothing to answer
            self.code = grpc.StatusCode.CANCELLED
            return False
        return True

    def end(self) -> None:
        _writes.give(self.held)
        metrics.RPCS.labels(self.action, self.code.name).inc()
        metrics.LATENCY.labels(self.action).observe(time.monotonic() - self.start)

    async def refuse(self) -> None:
        """Audit and log the failure, then end the call with its status (raises)."""
        code = self.code
        if self.audited or code is grpc.StatusCode.PERMISSION_DENIED or code is grpc.StatusCode.UNAUTHENTICATED:
            message = self.message
            if self.ident is None:
                # Who was refused: the certificate itself (fingerprint, URI SANs), not just "unauthenticated".
                pems = list(self.context.auth_context().get("x509_pem_cert") or [])
                message = f"{message} [{describe_certificate(pems[0]) if pems else 'no client certificate'}]"
            await audit_refusal(self.svc.store, self.action, self.ident, self.request, code, message, self.org_id)
        log.info("%s refused: %s", self.action, code.name,
                 extra={"method": self.action, "code": code.name, "actor": str(self.ident or "-")})
        await self.context.abort(code, self.message)
        raise AssertionError("unreachable")  # abort raises


def rpc(action: str, *, audited: bool = False) -> Callable[[Any], Any]:
    """Wrap a handler ``(self, request, context, ident)``: a coroutine function for a unary
    call, an async generator function for a server stream (see the module's docstring)."""

    def deco(fn: Any) -> Any:
        if inspect.isasyncgenfunction(fn):
            @functools.wraps(fn)
            async def stream(self: Servicer, request: Any, context: Ctx) -> AsyncIterator[Any]:
                call = _Call(self, action, audited, True, request, context)
                try:
                    ident = call.begin()
                    async with contextlib.aclosing(fn(self, request, context, ident)) as items:
                        async for item in items:
                            yield item
                except BaseException as e:
                    if not call.failed(e):
                        raise
                finally:
                    call.end()
                if call.code is not grpc.StatusCode.OK:
                    await call.refuse()
            return stream

        @functools.wraps(fn)
        async def unary(self: Servicer, request: Any, context: Ctx) -> Any:
            call = _Call(self, action, audited, False, request, context)
            try:
                ident = call.begin()
                budget = self.budget(context)
                CALL_DEADLINE.set(time.monotonic() + budget)
                call.deadline = True
                async with asyncio.timeout(budget):
                    reply = await fn(self, request, context, ident)
                failpoints.point(f"ca.reply.{action}")  # committed, not yet answered (the fault campaign)
                return reply
            except BaseException as e:
                if not call.failed(e):
                    raise
            finally:
                call.end()
            await call.refuse()
        return unary

    return deco


# ----------------------------------------------------------------- auditing refusals

_background: set[asyncio.Task[None]] = set()
AUDIT_WAIT_SECONDS = 2.0

REFUSALS = refusals.RefusalLedger()
"""Which refusals are audited one by one; the rest become aggregate rows (see ``refusals``)."""


async def flush_refusals(store: Store, *, final: bool = False) -> None:
    """Write the aggregate rows whose window has passed (every second, from the server)."""
    for agg in REFUSALS.due(time.monotonic(), force=final):
        metrics.AUDIT_SUPPRESSED.inc(agg.count)
        try:
            async with asyncio.timeout(30):
                await store.audit(Actor(agg.caller), agg.action, org_id=agg.org_id if agg.org_id != "*" else "",
                                  key_id="", outcome=agg.outcome, detail=agg.detail())
        except (KeywardError, TimeoutError):
            log.warning("could not write an aggregate refusal row (database unavailable)",
                        extra={"method": agg.action})


async def run_refusal_flusher(store: Store) -> None:
    try:
        while True:
            await asyncio.sleep(1.0)
            await flush_refusals(store)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.shield(flush_refusals(store, final=True))


def _recordable(value: str, check: Callable[[str], object]) -> str:
    """``value`` when it has the form ``check`` accepts, else a placeholder (never the input)."""
    if not value:
        return ""
    try:
        check(value)
    except (KeywardError, ValueError):
        return "<invalid>"
    return value


async def audit_refusal(store: Store, action: str, ident: Identity | None, request: Any,
                        code: grpc.StatusCode, message: str, org_id: str = "") -> None:
    """Audit a failed call. Waits up to AUDIT_WAIT_SECONDS, then lets the
    write finish in the background, so a stuck database (the very reason a
    call may have failed) cannot hold the caller's answer back."""
    # Only values of an id's form reach the audit columns: a caller may put anything in these
    # fields (a key in base64, once), and the audit log outlives every other copy.
    org_id = _recordable(org_id or str(getattr(request, "org_id", "")), lambda v: check_id(v, "org_id"))
    key_id = _recordable(str(getattr(request, "key_id", "")), uuid.UUID)
    caller = ident.spiffe_id if ident else "unauthenticated"
    if not REFUSALS.admit(caller, action, org_id, code.name, time.monotonic()):
        return  # counted: written as an aggregate row for (caller, action, org, outcome) within seconds

    async def write() -> None:
        try:
            async with asyncio.timeout(30):
                await store.audit(Actor(caller), action,
                                  org_id=org_id, key_id=key_id, outcome=code.name, detail=message)
        except (KeywardError, TimeoutError):
            log.warning("could not audit a refused %s (database unavailable)", action, extra={"method": action})

    task = asyncio.create_task(write())
    _background.add(task)
    task.add_done_callback(_background.discard)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(task), AUDIT_WAIT_SECONDS)
