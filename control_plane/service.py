"""gRPC servicers of the CA: the handlers of the Admin and KeyDistribution services.

Each handler receives the caller's identity from the call wrapper
(:func:`control_plane.calls.rpc`, which also caps the deadline, maps errors to
status codes, counts, logs and audits refusals), checks what the caller may do,
validates the input, calls the store and converts the result
(:mod:`control_plane.convert`). Admin actions are audited with their outcome;
key-distribution refusals are audited too.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from control_plane import authz, certs, metrics, spool
from control_plane.calls import Servicer, rpc
from control_plane.convert import (
    PolicyCache,
    algorithm_from_pb,
    algorithm_to_pb,
    audit_to_pb,
    event_to_pb,
    inter_to_pb,
    key_pair_to_pb,
    org_to_pb,
    policy_args,
    pool_to_pb,
    request_key,
    snapshot_to_pb,
)
from control_plane.custody import PendingKey, new_pending_key
from control_plane.deadline import keep, remaining
from control_plane.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    show,
)
from control_plane.events import EventHub, Overflow
from control_plane.identity import Identity, check_id
from control_plane.limits import Slots
from control_plane.spool import KeySentAuditor
from control_plane.store import Actor, KeyEventRow, OrgRow, PoolRow, Store
from control_plane.validator import Validator
from keylib.master import MasterSecret
from protos.keyward.v1 import keyward_pb2 as pb
from protos.keyward.v1 import keyward_pb2_grpc as pb_grpc


def _display_name(v: str) -> str:
    v = v.strip()
    if len(v) > 200 or any(ord(c) < 0x20 for c in v):
        raise InvalidArgument("display_name must be at most 200 printable characters")
    return v


# ------------------------------------------------------------------ Admin

class AdminService(Servicer, pb_grpc.AdminServicer):
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

    @rpc("CreateOrganization", audited=True)
    async def CreateOrganization(self, request: pb.CreateOrganizationRequest, context: Any, ident: Identity) -> pb.Organization:
        authz.require_platform_admin(ident, "create organizations")
        check_id(request.org_id, "org_id")
        policy = await self._validator.validate(**policy_args(request.policy))  # in its own process
        org = await self.store.create_org(Actor(ident.spiffe_id), request.org_id,
                                          _display_name(request.display_name) or request.org_id, policy,
                                          request_key(request))
        return org_to_pb(org)

    @rpc("GetOrganization")
    async def GetOrganization(self, request: pb.GetOrganizationRequest, context: Any, ident: Identity) -> pb.Organization:
        return org_to_pb(await self._visible_org(ident, request.org_id))

    @rpc("UpdatePolicy", audited=True)
    async def UpdatePolicy(self, request: pb.UpdatePolicyRequest, context: Any, ident: Identity) -> pb.Organization:
        check_id(request.org_id, "org_id")
        authz.require_admin_of(ident, request.org_id)
        if not request.HasField("policy"):
            raise InvalidArgument("policy is required (send the whole policy; absent fields take their defaults)")
        policy = await self._validator.validate(**policy_args(request.policy))  # in its own process
        org = await self.store.update_policy(Actor(ident.spiffe_id), request.org_id, policy,
                                             request.expected_policy_version, request_key(request))
        return org_to_pb(org)

    @rpc("RegisterZenPool", audited=True)
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
                                             request_key(request))
        return pool_to_pb(row)

    @rpc("DeregisterZenPool", audited=True)
    async def DeregisterZenPool(self, request: pb.DeregisterZenPoolRequest, context: Any,
                                ident: Identity) -> pb.ZenPool:
        authz.require_platform_admin(ident, "deregister ZEN pools")
        check_id(request.name, "name")
        return pool_to_pb(await self.store.deregister_pool(Actor(ident.spiffe_id), request.name,
                                                           request_key(request)))

    @rpc("ListZenPools")
    async def ListZenPools(self, request: pb.ListZenPoolsRequest, context: Any, ident: Identity) -> pb.ListZenPoolsResponse:
        authz.require_platform_admin(ident, "list ZEN pools")
        return pb.ListZenPoolsResponse(pools=[pool_to_pb(p) for p in await self.store.list_pools()])

    @rpc("RequestIntermediateCsr", audited=True)
    async def RequestIntermediateCsr(self, request: pb.RequestIntermediateCsrRequest, context: Any,
                                     ident: Identity) -> pb.RequestIntermediateCsrResponse:
        org = await self._visible_org(ident, request.org_id)
        alg = algorithm_from_pb(request.algorithm)
        cn = certs.check_subject_field(request.common_name, "common_name") or f"{org.org_id} keyward intermediate"
        o = certs.check_subject_field(request.organization, "organization") or org.display_name[:64]
        rid, actor = request_key(request), Actor(ident.spiffe_id)
        result = await self.store.replayed(rid, actor, "RequestIntermediateCsr")
        if result is None:
            pending = await self._generate(org_id=org.org_id, algorithm=alg, common_name=cn, organization=o,
                                           constraints=org.policy.name_constraints)
            result = await self.store.add_pending_key(actor, pending, rid)
        return pb.RequestIntermediateCsrResponse(
            key_id=result["key_id"], algorithm=algorithm_to_pb(certs.KeyAlgorithm(result["algorithm"])),
            csr_pem=result["csr_pem"], public_key_sha256=result["spki_sha256"])

    @rpc("UploadIntermediateCertificate", audited=True)
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
            request_key(request))
        return inter_to_pb(row)

    @rpc("ListIntermediates")
    async def ListIntermediates(self, request: pb.ListIntermediatesRequest, context: Any,
                                ident: Identity) -> pb.ListIntermediatesResponse:
        await self._visible_org(ident, request.org_id)
        rows = await self.store.list_intermediates(request.org_id)
        return pb.ListIntermediatesResponse(intermediates=[inter_to_pb(r) for r in rows])

    @rpc("RevokeIntermediate", audited=True)
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
                                      request_key(request))
        return inter_to_pb(row)

    @rpc("ListAuditEvents")
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
            audit_to_pb(r, h) for r, h in rows])


# ------------------------------------------------------- KeyDistribution

class KeyDistributionService(Servicer, pb_grpc.KeyDistributionServicer):
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
        self._policies = PolicyCache()
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

    @rpc("GetKeyPair")
    async def GetKeyPair(self, request: pb.GetKeyPairRequest, context: Any, ident: Identity) -> pb.KeyPair:
        name = authz.require_zen(ident)
        org_id = check_id(request.org_id, "org_id")
        floor = max(request.min_version, self._sent.get(org_id, 0))
        # Pool, org and key from one snapshot (no key goes out on a binding just removed), of any
        # server not behind a key already sent (a lagging standby's is not taken), read in time for
        # the audit that must precede the key (half the call at most: a short one still reads).
        with keep(min(spool.RESERVE, remaining(0.0) / 2)):
            pool, org, key = await self.store.distribution_view(name, org_id, floor=floor)
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
        return key_pair_to_pb(key, org, self._policies.get(org))

    @rpc("GetCaInfo")
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

    @rpc("WatchKeys")
    async def WatchKeys(self, request: pb.WatchKeysRequest, context: Any, ident: Identity
                        ) -> AsyncIterator[pb.KeyEvent]:
        sub = self.hub.subscribe()
        metrics.WATCHERS.inc()
        held = ""
        try:
            held = self._streams.take(ident.spiffe_id)
            pool = await self._pool(ident)
            orgs = {check_id(o, "org_ids entry") for o in request.org_ids}
            if len(orgs) > 1000:
                raise InvalidArgument("watch at most 1000 org_ids per stream (or none: every org the pool serves)")
            refused = await self.store.unserved(pool.name, orgs)  # the rule, and the refusal, of GetKeyPair
            if refused:
                known = await self.store.get_org(refused[0], replica_ok=True) is not None
                metrics.KEYS_REFUSED.labels(refused[0] if known else "-").inc()
                raise authz.key_refusal(pool.name, refused[0])
            await self.hub.ready(5.0)
            # Where the log ends now, not where the hub last looked (up to a poll behind): an event
            # committed before this stream opened is history (after_seq), never sent as news.
            last = max(self.hub.last_seq, await self.store.last_event_seq())
            await context.send_initial_metadata((("keyward-event-seq", str(last)),))
            if request.snapshot:
                for org in await self.store.orgs_served(pool):
                    if not orgs or org.org_id in orgs:
                        yield snapshot_to_pb(org, self._policies.get(org))
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
                except Overflow:
                    raise ResourceExhausted("watcher fell behind; reconnect with after_seq") from None
                if ev.seq <= last:
                    continue
                last = ev.seq
                if (msg := await self._deliverable(pool.name, ev, orgs)) is not None:
                    yield msg
        finally:
            self._streams.give(held)
            self.hub.unsubscribe(sub)
            metrics.WATCHERS.dec()
