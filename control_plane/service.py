"""gRPC servicers of the CA: the only module that touches protobuf types.

Each handler: identify the caller from its mTLS certificate, cap the
deadline, validate the input, call the store, convert the result. Errors
from :mod:`control_plane.errors` are mapped to status codes in
:data:`STATUS` (the one place), with their message; anything else becomes
INTERNAL with a reference id and no details. Admin actions are audited with
their outcome; key-distribution refusals are audited too.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from control_plane import authz, certs, metrics, refusals
from control_plane.custody import PendingKey, new_pending_key
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
    show,
    Unauthenticated,
    Unavailable,
)
from control_plane.deadline import CALL_DEADLINE
from control_plane.events import EventHub, Overflow
from control_plane.spool import KeySentAuditor
from control_plane.limits import ByteLRU, Rate, Slots
from control_plane.validator import Validator
from control_plane.identity import Identity, Role, check_id, describe_certificate, from_certificate
from control_plane.policy import FailMode, Policy, validate
from control_plane.store import NO_REQUEST, Actor, RequestKey, IntermediateRow, KeyEventRow, OrgRow, PoolRow, Store
from keylib.master import MasterSecret
from protos.keyward.v1 import keyward_pb2 as pb
from protos.keyward.v1 import keyward_pb2_grpc as pb_grpc

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


# ------------------------------------------------------------- conversions

_ALG_TO_PB = {
    certs.KeyAlgorithm.RSA_2048: pb.KEY_ALGORITHM_RSA_2048,
    certs.KeyAlgorithm.RSA_3072: pb.KEY_ALGORITHM_RSA_3072,
    certs.KeyAlgorithm.RSA_4096: pb.KEY_ALGORITHM_RSA_4096,
    certs.KeyAlgorithm.EC_P256: pb.KEY_ALGORITHM_EC_P256,
    certs.KeyAlgorithm.EC_P384: pb.KEY_ALGORITHM_EC_P384,
}
_PB_TO_ALG = {v: k for k, v in _ALG_TO_PB.items()}
_PB_TO_ALG[pb.KEY_ALGORITHM_UNSPECIFIED] = certs.KeyAlgorithm.RSA_2048

_STATE_TO_PB = {
    "pending": pb.INTERMEDIATE_STATE_PENDING,
    "active": pb.INTERMEDIATE_STATE_ACTIVE,
    "rotated": pb.INTERMEDIATE_STATE_ROTATED,
    "revoked": pb.INTERMEDIATE_STATE_REVOKED,
    "discarded": pb.INTERMEDIATE_STATE_DISCARDED,
}
_EVENT_TO_PB = {
    "rotated": pb.KEY_EVENT_KIND_ROTATED,
    "revoked": pb.KEY_EVENT_KIND_REVOKED,
    "policy_changed": pb.KEY_EVENT_KIND_POLICY_CHANGED,
    "access_revoked": pb.KEY_EVENT_KIND_ACCESS_REVOKED,
}


def _ts(t: dt.datetime | None) -> Timestamp | None:
    if t is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(t)
    return ts


def policy_from_pb(p: pb.Policy) -> Policy:
    return validate(**policy_args(p))


def policy_args(p: pb.Policy) -> dict[str, Any]:
    """The arguments of ``policy.validate`` (plain values, for the validator process)."""
    if p.fail_mode not in (pb.FAIL_MODE_UNSPECIFIED, pb.FAIL_MODE_OPEN, pb.FAIL_MODE_CLOSED):
        raise InvalidArgument(f"policy.fail_mode {p.fail_mode} is unknown (use FAIL_MODE_OPEN or FAIL_MODE_CLOSED)")
    return dict(
        private_zen_only=p.private_zen_only,
        fail_mode=FailMode.CLOSED if p.fail_mode == pb.FAIL_MODE_CLOSED else FailMode.OPEN,
        key_idle_timeout_seconds=p.key_idle_timeout_seconds,
        location_cidrs=list(p.location_cidrs),
        blocked_hosts=list(p.blocked_hosts),
        blocked_url_prefixes=list(p.blocked_url_prefixes),
        do_not_inspect_hosts=list(p.do_not_inspect_hosts),
        proxy_credential_verifiers=list(p.proxy_credential_verifiers),
        permitted_dns_subtrees=list(p.permitted_dns_subtrees),
        excluded_dns_subtrees=list(p.excluded_dns_subtrees),
    )


def policy_to_pb(p: Policy) -> pb.Policy:
    return pb.Policy(
        private_zen_only=p.private_zen_only,
        fail_mode=pb.FAIL_MODE_CLOSED if p.fail_mode is FailMode.CLOSED else pb.FAIL_MODE_OPEN,
        key_idle_timeout_seconds=p.key_idle_timeout_seconds,
        location_cidrs=list(p.location_cidrs),
        blocked_hosts=list(p.blocked_hosts),
        blocked_url_prefixes=list(p.blocked_url_prefixes),
        do_not_inspect_hosts=list(p.do_not_inspect_hosts),
        proxy_credential_verifiers=list(p.proxy_credential_verifiers),
        permitted_dns_subtrees=list(p.permitted_dns_subtrees),
        excluded_dns_subtrees=list(p.excluded_dns_subtrees),
    )


def org_to_pb(o: OrgRow) -> pb.Organization:
    return pb.Organization(org_id=o.org_id, display_name=o.display_name, policy=policy_to_pb(o.policy),
                           policy_version=o.policy_version, active_key_id=o.active_key_id,
                           created_at=_ts(o.created_at), updated_at=_ts(o.updated_at))


def pool_to_pb(p: PoolRow) -> pb.ZenPool:
    return pb.ZenPool(name=p.name, org_ids=list(p.org_ids), serves_fail_closed_org=p.serves_fail_closed,
                      visibility=pb.POOL_VISIBILITY_PUBLIC if p.visibility == "public" else pb.POOL_VISIBILITY_PRIVATE)


def inter_to_pb(r: IntermediateRow) -> pb.Intermediate:
    return pb.Intermediate(
        key_id=r.key_id, org_id=r.org_id, state=_STATE_TO_PB[r.state], version=r.version,
        algorithm=_ALG_TO_PB[r.algorithm], public_key_sha256=r.spki_sha256.hex(), subject=r.subject,
        serial_hex=r.serial_hex, not_before=_ts(r.not_before), not_after=_ts(r.not_after),
        created_at=_ts(r.created_at), activated_at=_ts(r.activated_at), ended_at=_ts(r.ended_at))


def event_to_pb(e: KeyEventRow) -> pb.KeyEvent:
    """The event without a policy (WatchKeys adds the org's policy to policy_changed events)."""
    return pb.KeyEvent(seq=e.seq, kind=_EVENT_TO_PB[e.kind], org_id=e.org_id, key_id=e.key_id,
                       version=e.version, policy_version=e.policy_version, at=_ts(e.at))


def _request_key(request: Any) -> RequestKey:
    v = request.request_id
    if len(v) > 128 or any(not (c.isascii() and (c.isalnum() or c in "-_.:")) for c in v):
        raise InvalidArgument("request_id must be at most 128 characters of letters, digits and -_.: (a UUID is ideal)")
    if not v:
        return NO_REQUEST
    rest = type(request)()
    rest.CopyFrom(request)
    rest.request_id = ""
    return RequestKey(v, hashlib.sha256(rest.SerializeToString(deterministic=True)).hexdigest()[:32])


def _display_name(v: str) -> str:
    v = v.strip()
    if len(v) > 200 or any(ord(c) < 0x20 for c in v):
        raise InvalidArgument("display_name must be at most 200 printable characters")
    return v


# ------------------------------------------------------------ call wrapper

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp], Identity], Awaitable[Resp]]


class _Base:
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

    async def _audit_failure(self, action: str, ident: Identity | None, request: Any,
                             code: grpc.StatusCode, message: str,
                             context: grpc.aio.ServicerContext[Any, Any] | None = None) -> None:
        if ident is None and context is not None:
            # Who was refused: the certificate itself (fingerprint, URI SANs), not just "unauthenticated".
            pems = list(context.auth_context().get("x509_pem_cert") or [])
            message = f"{message} [{describe_certificate(pems[0]) if pems else 'no client certificate'}]"
        await _audit_failure_impl(self.store, action, ident, request, code, message)

    def budget(self, context: grpc.aio.ServicerContext[Any, Any]) -> float:
        remaining = context.time_remaining()
        if remaining is None:
            return self.max_call_seconds
        return max(0.0, min(remaining, self.max_call_seconds))


MAX_CONCURRENT_WRITES = 2
"""Admin writes one identity may have in flight at once: one org admin's burst of writes cannot
occupy the CA (or its write lock) that every tenant shares."""


_writes = Slots("writes", MAX_CONCURRENT_WRITES, "retry when one has finished")
_write_rate = Rate("Admin writes", 5.0, 20)
"""Every write holds the CA's write lock (the audit chain) through synchronous replication, which
every tenant's audited calls share: one identity may not take more than its share of it."""


def unary(action: str, *, audited: bool) -> Callable[[Handler[Req, Resp]], Callable[..., Awaitable[Resp]]]:
    """Wrap a unary handler: identity, deadline cap, error mapping, metrics, audit of failures."""

    def deco(fn: Handler[Req, Resp]) -> Callable[..., Awaitable[Resp]]:
        @functools.wraps(fn)
        async def wrapper(self: _Base, request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> Resp:
            start = time.monotonic()
            code = grpc.StatusCode.OK
            ident: Identity | None = None
            message = ""
            held = ""
            try:
                ident = self.identify(context)
                if audited:  # a write: at most MAX_CONCURRENT_WRITES at once per identity, at a bounded rate
                    held = _writes.take(ident.spiffe_id)
                    _write_rate.take(ident.spiffe_id, time.monotonic())
                budget = self.budget(context)
                CALL_DEADLINE.set(time.monotonic() + budget)
                async with asyncio.timeout(budget):
                    return await fn(self, request, context, ident)
            except KeywardError as e:
                code, message = status_of(e), str(e)[:1000]
                if isinstance(e, Unavailable):
                    metrics.DB_ERRORS.inc()
            except TimeoutError:
                code = grpc.StatusCode.DEADLINE_EXCEEDED
                message = f"{action} did not finish within its deadline (server cap {self.max_call_seconds:g}s)"
            except Exception:
                ref = uuid.uuid4().hex[:12]
                log.exception("unexpected error in %s (ref %s)", action, ref, extra={"method": action})
                code, message = grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); the request was not applied"
            finally:
                _writes.give(held)
                metrics.RPCS.labels(action, code.name).inc()
                metrics.LATENCY.labels(action).observe(time.monotonic() - start)
            if audited or code is grpc.StatusCode.PERMISSION_DENIED or code is grpc.StatusCode.UNAUTHENTICATED:
                await self._audit_failure(action, ident, request, code, message, context)
            log.info("%s refused: %s", action, code.name,
                     extra={"method": action, "code": code.name, "actor": str(ident or "-")})
            await context.abort(code, message)
            raise AssertionError("unreachable")  # abort raises

        return wrapper

    return deco


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


async def _audit_failure_impl(store: Store, action: str, ident: Identity | None, request: Any,
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
    try:
        await asyncio.wait_for(asyncio.shield(task), AUDIT_WAIT_SECONDS)
    except TimeoutError:
        pass


# ------------------------------------------------------------------ Admin

class AdminService(_Base, pb_grpc.AdminServicer):
    def __init__(self, store: Store, master: MasterSecret, trust_domain: str, max_call_seconds: float,
                 keygen_slots: int = 2, validator: Validator | None = None) -> None:
        super().__init__(store, trust_domain, max_call_seconds)
        self._validator = validator or Validator()
        self._master = master
        self._keygen = asyncio.Semaphore(keygen_slots)

    async def _generate(self, **kw: Any) -> PendingKey:
        """Key generation is CPU-bound: off the event loop, at most
        ``keygen_slots`` at once. A slot is freed when its thread ends, not
        when a caller gives up, so abandoned calls cannot pile up threads."""
        await self._keygen.acquire()
        fut = asyncio.get_running_loop().run_in_executor(
            None, functools.partial(new_pending_key, self._master, **kw))
        fut.add_done_callback(lambda _: self._keygen.release())
        return await asyncio.shield(fut)

    async def _visible_org(self, ident: Identity, org_id: str) -> OrgRow:
        check_id(org_id, "org_id")
        authz.require_admin_of(ident, org_id)
        org = await self.store.get_org(org_id)
        if org is None:
            raise NotFound(f"organization {org_id!r} not found")
        return org

    @unary("CreateOrganization", audited=True)
    async def CreateOrganization(self, request: pb.CreateOrganizationRequest, context: Any, ident: Identity) -> pb.Organization:
        authz.require_platform_admin(ident, "create organizations")
        check_id(request.org_id, "org_id")
        policy = await self._validator.validate(**policy_args(request.policy))  # in its own process
        org = await self.store.create_org(Actor(ident.spiffe_id), request.org_id,
                                          _display_name(request.display_name) or request.org_id, policy,
                                          _request_key(request))
        return org_to_pb(org)

    @unary("GetOrganization", audited=False)
    async def GetOrganization(self, request: pb.GetOrganizationRequest, context: Any, ident: Identity) -> pb.Organization:
        return org_to_pb(await self._visible_org(ident, request.org_id))

    @unary("UpdatePolicy", audited=True)
    async def UpdatePolicy(self, request: pb.UpdatePolicyRequest, context: Any, ident: Identity) -> pb.Organization:
        check_id(request.org_id, "org_id")
        authz.require_admin_of(ident, request.org_id)
        if not request.HasField("policy"):
            raise InvalidArgument("policy is required (send the whole policy; absent fields take their defaults)")
        policy = await self._validator.validate(**policy_args(request.policy))  # in its own process
        org = await self.store.update_policy(Actor(ident.spiffe_id), request.org_id, policy,
                                             request.expected_policy_version, _request_key(request))
        return org_to_pb(org)

    @unary("RegisterZenPool", audited=True)
    async def RegisterZenPool(self, request: pb.RegisterZenPoolRequest, context: Any, ident: Identity) -> pb.ZenPool:
        authz.require_platform_admin(ident, "register ZEN pools")
        p = request.pool
        check_id(p.name, "pool.name")
        if p.visibility == pb.POOL_VISIBILITY_PUBLIC:
            if p.org_ids:
                raise InvalidArgument("a public pool serves every non-private org; org_ids are for private pools only")
            vis = "public"
        elif p.visibility == pb.POOL_VISIBILITY_PRIVATE:
            vis = "private"
        else:
            raise InvalidArgument("pool.visibility is required: POOL_VISIBILITY_PUBLIC or POOL_VISIBILITY_PRIVATE")
        for o in p.org_ids:
            check_id(o, "pool.org_ids entry")
        if len(p.org_ids) > 1000:
            raise InvalidArgument("a pool may be bound to at most 1000 orgs")
        row = await self.store.register_pool(Actor(ident.spiffe_id), p.name, vis, list(p.org_ids),
                                             _request_key(request))
        return pool_to_pb(row)

    @unary("DeregisterZenPool", audited=True)
    async def DeregisterZenPool(self, request: pb.DeregisterZenPoolRequest, context: Any,
                                ident: Identity) -> pb.ZenPool:
        authz.require_platform_admin(ident, "deregister ZEN pools")
        check_id(request.name, "name")
        return pool_to_pb(await self.store.deregister_pool(Actor(ident.spiffe_id), request.name,
                                                           _request_key(request)))

    @unary("ListZenPools", audited=False)
    async def ListZenPools(self, request: pb.ListZenPoolsRequest, context: Any, ident: Identity) -> pb.ListZenPoolsResponse:
        authz.require_platform_admin(ident, "list ZEN pools")
        return pb.ListZenPoolsResponse(pools=[pool_to_pb(p) for p in await self.store.list_pools()])

    @unary("RequestIntermediateCsr", audited=True)
    async def RequestIntermediateCsr(self, request: pb.RequestIntermediateCsrRequest, context: Any,
                                     ident: Identity) -> pb.RequestIntermediateCsrResponse:
        org = await self._visible_org(ident, request.org_id)
        if request.algorithm not in _PB_TO_ALG:
            raise InvalidArgument(f"algorithm {request.algorithm} is unknown; use RSA_2048/3072/4096 or EC_P256/P384")
        alg = _PB_TO_ALG[request.algorithm]
        cn = certs.check_subject_field(request.common_name, "common_name") or f"{org.org_id} keyward intermediate"
        o = certs.check_subject_field(request.organization, "organization") or org.display_name[:64]
        rid, actor = _request_key(request), Actor(ident.spiffe_id)
        result = await self.store.replayed(rid, actor, "RequestIntermediateCsr")
        if result is None:
            pending = await self._generate(org_id=org.org_id, algorithm=alg, common_name=cn, organization=o,
                                           constraints=org.policy.name_constraints)
            result = await self.store.add_pending_key(actor, pending, rid)
        return pb.RequestIntermediateCsrResponse(
            key_id=result["key_id"], algorithm=_ALG_TO_PB[certs.KeyAlgorithm(result["algorithm"])],
            csr_pem=result["csr_pem"], public_key_sha256=result["spki_sha256"])

    @unary("UploadIntermediateCertificate", audited=True)
    async def UploadIntermediateCertificate(self, request: pb.UploadIntermediateCertificateRequest, context: Any,
                                            ident: Identity) -> pb.Intermediate:
        org = await self._visible_org(ident, request.org_id)
        # Parse once up front so malformed input fails before any database work.
        certs.parse_pem_certs(request.certificate_pem, "certificate_pem", max_count=1)
        certs.parse_pem_certs(request.chain_pem, "chain_pem", max_count=certs.MAX_CHAIN)
        row = await self.store.activate(
            Actor(ident.spiffe_id), request.org_id,
            lambda fp: certs.validate_intermediate(request.certificate_pem, request.chain_pem,
                                                   pending_spki_sha256=fp,
                                                   constraints=org.policy.name_constraints),
            _request_key(request))
        return inter_to_pb(row)

    @unary("ListIntermediates", audited=False)
    async def ListIntermediates(self, request: pb.ListIntermediatesRequest, context: Any,
                                ident: Identity) -> pb.ListIntermediatesResponse:
        await self._visible_org(ident, request.org_id)
        rows = await self.store.list_intermediates(request.org_id)
        return pb.ListIntermediatesResponse(intermediates=[inter_to_pb(r) for r in rows])

    @unary("RevokeIntermediate", audited=True)
    async def RevokeIntermediate(self, request: pb.RevokeIntermediateRequest, context: Any,
                                 ident: Identity) -> pb.Intermediate:
        await self._visible_org(ident, request.org_id)
        try:
            key_id = str(uuid.UUID(request.key_id))
        except ValueError:
            raise InvalidArgument(f"key_id {show(request.key_id)} is not a UUID (see ListIntermediates)") from None
        if len(request.reason) > 200:
            raise InvalidArgument("reason must be at most 200 characters")
        row = await self.store.revoke(Actor(ident.spiffe_id), request.org_id, key_id, request.reason,
                                      _request_key(request))
        return inter_to_pb(row)

    @unary("ListAuditEvents", audited=False)
    async def ListAuditEvents(self, request: pb.ListAuditEventsRequest, context: Any,
                              ident: Identity) -> pb.ListAuditEventsResponse:
        if request.org_id:
            check_id(request.org_id, "org_id")
            authz.require_admin_of(ident, request.org_id)
            org: str | None = request.org_id
        else:
            authz.require_platform_admin(ident, "list every org's audit events (give org_id)")
            org = None
        limit = request.limit or 100
        if not 1 <= limit <= 1000:
            raise InvalidArgument("limit must be within 1..1000")
        rows = await self.store.list_audit(org, request.after_seq, limit)
        return pb.ListAuditEventsResponse(events=[
            pb.AuditEvent(seq=r.seq, at=_ts(r.at), actor=r.actor, action=r.action, org_id=r.org_id,
                          key_id=r.key_id, outcome=r.outcome, detail=r.detail, hash_hex=h.hex())
            for r, h in rows])


# ------------------------------------------------------- KeyDistribution

class _PolicyCache:
    """Policies as messages, per (org, version), within 16 MiB: a replay to many ZENs converts
    each policy once, and what the CA holds for it does not grow with the number of streams."""

    BUDGET = 16 << 20

    def __init__(self) -> None:
        self._lru: ByteLRU[tuple[str, int], pb.Policy] = ByteLRU(self.BUDGET, lambda m: m.ByteSize())

    def get(self, org: OrgRow) -> pb.Policy:
        return self._lru.get((org.org_id, org.policy_version), lambda: policy_to_pb(org.policy))


class KeyDistributionService(_Base, pb_grpc.KeyDistributionServicer):
    def __init__(self, store: Store, hub: EventHub, auditor: KeySentAuditor, trust_domain: str,
                 max_call_seconds: float, max_stream_seconds: float = 3600.0,
                 max_watch_streams: int = 64, master_check: str = "") -> None:
        super().__init__(store, trust_domain, max_call_seconds)
        self.max_stream_seconds = max_stream_seconds
        #: The master secret's check value (keylib.kdf.master_check_value): not secret.
        self.master_check = master_check
        #: WatchKeys streams per identity: every ZEN of a pool holds one, a flood of them holds nothing.
        self._streams = Slots("WatchKeys streams", max_watch_streams,
                              "each ZEN needs one; close streams you no longer read")
        self._policies = _PolicyCache()
        self.hub = hub
        self.auditor = auditor
        #: Newest key version sent per org by this process (stale-read guard).
        self._sent: dict[str, int] = {}

    async def _pool(self, ident: Identity) -> PoolRow:
        name = authz.require_zen(ident)
        pool = await self.store.get_pool(name)
        if pool is None:
            raise PermissionDenied(f"ZEN pool {name!r} is not registered with the CA (RegisterZenPool)")
        return pool

    @unary("GetKeyPair", audited=False)
    async def GetKeyPair(self, request: pb.GetKeyPairRequest, context: Any, ident: Identity) -> pb.KeyPair:
        name = authz.require_zen(ident)
        org_id = check_id(request.org_id, "org_id")
        floor = max(request.min_version, self._sent.get(org_id, 0))
        # Pool, org and key from one snapshot: no key goes out on a binding just removed.
        pool, org, key = await self.store.distribution_view(name, org_id)
        if org is not None and (key.version if key else 0) < floor:
            # A lagging standby answered: ask the primary, or fail rather
            # than hand out a key older than one already sent.
            pool, org, key = await self.store.distribution_view(name, org_id, replica_ok=False)
        if pool is None:
            raise PermissionDenied(f"ZEN pool {name!r} is not registered with the CA (RegisterZenPool)")
        if org is None or not pool.serves(org_id, org.policy.private_zen_only):
            # Metrics are internal: label the org when it exists (bounded cardinality).
            metrics.KEYS_REFUSED.labels(org_id if org is not None else "-").inc()
            raise authz.key_refusal(pool.name, org_id)
        if key is None:
            raise FailedPrecondition(f"organization {org_id!r} has no active intermediate certificate yet")
        if key.version < request.min_version:
            raise FailedPrecondition(f"key version {request.min_version} of {org_id!r} is not active here; "
                                     f"the newest is {key.version}")
        await self.auditor.key_sent(Actor(ident.spiffe_id), org_id, key.key_id,
                                    f"pool={pool.name} version={key.version}")
        self._sent[org_id] = max(self._sent.get(org_id, 0), key.version)
        metrics.KEYS_SENT.labels(org_id).inc()
        return pb.KeyPair(
            org_id=org_id, key_id=key.key_id, version=key.version, algorithm=_ALG_TO_PB[key.algorithm],
            encrypted_private_key=key.sealed_key, keylib_format=key.keylib_format,
            public_key_sha256=key.spki_sha256.hex(), certificate_pem=key.certificate_pem,
            chain_pem=key.chain_pem, not_after=_ts(key.not_after), policy=policy_to_pb(org.policy),
            policy_version=org.policy_version)

    @unary("GetCaInfo", audited=False)
    async def GetCaInfo(self, request: pb.GetCaInfoRequest, context: Any, ident: Identity) -> pb.CaInfo:
        """Any valid identity (the call wrapper checked it): a ZEN compares the check value with its own."""
        return pb.CaInfo(master_check=self.master_check)

    async def _deliverable(self, pool_name: str, ev: KeyEventRow, orgs: set[str]) -> pb.KeyEvent | None:
        """The message for ``ev`` on this pool's stream, or None when the pool must not see it.

        Whether it may is a pure check of the event's audience, fixed when it was written
        (:func:`authz.event_reaches`): no read. A policy change reads the org for its policy,
        which is sent only while it is still the one the event made (the audience was entitled
        to exactly that one); a later change follows in the log otherwise."""
        if (orgs and ev.org_id not in orgs) or not authz.event_reaches(pool_name, ev.audience):
            return None
        msg = event_to_pb(ev)
        if ev.kind == "policy_changed":
            org = await self.store.get_org(ev.org_id, replica_ok=True)
            if org is not None and org.policy_version < ev.policy_version:
                org = await self.store.get_org(ev.org_id)  # a standby behind the event: ask the primary
            if org is None or org.policy_version != ev.policy_version:
                # A later change follows in the log; only the newest policy is ever worth sending.
                return None
            msg.policy.CopyFrom(self._policies.get(org))
        return msg

    async def WatchKeys(self, request: pb.WatchKeysRequest, context: grpc.aio.ServicerContext[Any, Any]
                        ) -> AsyncIterator[pb.KeyEvent]:
        code, message = grpc.StatusCode.OK, ""
        ident: Identity | None = None
        denied_org = ""
        held = ""
        sub = self.hub.subscribe()
        metrics.WATCHERS.inc()
        try:
            ident = self.identify(context)
            held = self._streams.take(ident.spiffe_id)
            pool = await self._pool(ident)
            orgs = {check_id(o, "org_ids entry") for o in request.org_ids}
            if len(orgs) > 1000:
                raise InvalidArgument("watch at most 1000 org_ids per stream (or none: every org the pool serves)")
            refused = await self.store.unserved(pool.name, orgs)  # the rule, and the refusal, of GetKeyPair
            if refused:
                denied_org = refused[0]
                known = await self.store.get_org(denied_org, replica_ok=True) is not None
                metrics.KEYS_REFUSED.labels(denied_org if known else "-").inc()
                raise authz.key_refusal(pool.name, denied_org)
            await self.hub.ready(5.0)
            # Where the log ends now, not where the hub last looked (up to a poll behind): an event
            # committed before this stream opened is history (after_seq), never sent as news.
            last = max(self.hub.last_seq, await self.store.last_event_seq())
            await context.send_initial_metadata((("keyward-event-seq", str(last)),))
            if request.snapshot:
                for org in await self.store.orgs_served(pool):
                    if not orgs or org.org_id in orgs:
                        yield pb.KeyEvent(seq=0, kind=pb.KEY_EVENT_KIND_POLICY_CHANGED, org_id=org.org_id,
                                          key_id=org.active_key_id, policy=policy_to_pb(org.policy),
                                          policy_version=org.policy_version, at=_ts(org.updated_at))
            if request.after_seq:
                last = request.after_seq
                while True:
                    backlog = await self.store.events_after(last)
                    for ev in backlog:
                        last = ev.seq
                        if (msg := await self._deliverable(pool.name, ev, orgs)) is not None:
                            yield msg
                    if len(backlog) < 500:
                        break
            ends = time.monotonic() + self.max_stream_seconds
            while True:
                try:
                    async with asyncio.timeout(max(0.0, ends - time.monotonic())):
                        ev = await sub.get()
                except TimeoutError:
                    # Streams are capped too: the ZEN reconnects with after_seq.
                    break
                if ev.seq <= last:
                    continue
                last = ev.seq
                if (msg := await self._deliverable(pool.name, ev, orgs)) is not None:
                    yield msg
        except Overflow:
            code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, "watcher fell behind; reconnect with after_seq"
        except KeywardError as e:
            code, message = status_of(e), str(e)
        finally:
            self._streams.give(held)
            self.hub.unsubscribe(sub)
            metrics.WATCHERS.dec()
        metrics.RPCS.labels("WatchKeys", code.name).inc()
        if code is grpc.StatusCode.PERMISSION_DENIED or code is grpc.StatusCode.UNAUTHENTICATED:
            await _audit_failure_impl(self.store, "WatchKeys", ident, request, code, message, denied_org)
        if code is not grpc.StatusCode.OK:
            await context.abort(code, message)
