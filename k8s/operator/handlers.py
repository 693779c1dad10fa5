"""The operator's kopf handlers: the I/O shell around ``plan`` and ``reconcile``.

One ZenPool becomes a Deployment, a Service and a PodDisruptionBudget, an
mTLS identity Secret and a registration with the CA. Every ``interval`` each
pool is checked again: ``sync_pool`` observes it, ``plan`` decides (placement,
evictions, registration order, bypass, status) and ``sync_pool`` carries the
plan out. The Postgres StatefulSet is watched the same way for a lost primary
(see ``dbwatch``). ``register(registry, cfg)`` attaches everything to a kopf
registry, so the tests run the real kopf machinery with their own settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import kopf

from k8s.operator import dbwatch, metrics, pki, plan
from k8s.operator import reconcile as rc
from k8s.operator.ca_client import CAClient, CARefused, CAUnavailable, PoolState
from k8s.operator.config import OperatorConfig
from k8s.operator.kube import Endpoint, Kube, KubeError, Obj, path, selector_string

GROUP, VERSION, PLURAL = "keyward.io", "v1alpha1", "zenpools"
FINALIZER = "keyward.io/operator"
log = logging.getLogger("keyward.operator")
PKI_CHECK = 600.0
"""Seconds between checks of the platform identities' expiry."""


@dataclass
class State:
    cfg: OperatorConfig
    kube: Kube
    ca: CAClient
    rel: rc.Release
    db: dbwatch.DbWatch = field(default_factory=dbwatch.DbWatch)
    _pools: tuple[float, dict[str, PoolState]] | None = None
    pki_checked: float = field(default_factory=time.monotonic)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def lock(self, pool: str) -> asyncio.Lock:
        """One pool is reconciled by one task at a time (kopf runs timers beside change handlers)."""
        return self._locks.setdefault(pool, asyncio.Lock())

    async def rotate_platform(self) -> None:
        """Renew the platform identities when due (checked every PKI_CHECK seconds); a renewed
        CA server identity rolls the CA's pods, which read it at start."""
        if time.monotonic() - self.pki_checked < PKI_CHECK:
            return
        self.pki_checked = time.monotonic()
        root, issued = await pki.ensure_platform(self.kube, self.cfg)
        if root.pem != self.ca.root.pem:
            await self.ca.close()
            self.ca = CAClient(self.cfg, root)
        if f"{self.cfg.release}-ca-tls" in issued:
            await self.kube.patch(path("apps/v1", "statefulsets", self.cfg.namespace, f"{self.cfg.release}-ca"),
                                  {"spec": {"template": {"metadata": {"annotations": {
                                      "keyward.io/tls-renewed": _now()}}}}})

    async def tick(self) -> None:
        """Every interval, with or without pools: platform identities, then stale registrations."""
        await self.rotate_platform()
        try:
            gone = await sweep_registrations(self)
        except (CAUnavailable, CARefused) as e:
            log.info("registration sweep skipped: %s", e)
            return
        for name in gone:
            log.info("pool %s has no ZenPool: deregistered from the CA", name)

    def forget_pools(self) -> None:
        """The CA's view changed (we registered or deregistered): read it afresh next time."""
        self._pools = None

    async def ca_pools(self) -> dict[str, PoolState]:
        """The CA's view of the pools, cached for one interval."""
        now = time.monotonic()
        if self._pools is None or now - self._pools[0] > self.cfg.interval:
            self._pools = (now, await self.ca.pools())
        return self._pools[1]


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _names(rel: rc.Release, pool: str) -> str:
    return f"{rel.name}-zen-{pool}"


def _owner(body: Mapping[str, Any]) -> list[Obj]:
    """The ZenPool owns its objects: the garbage collector removes whatever a deletion leaves."""
    meta = body.get("metadata") or {}
    return [{"apiVersion": f"{GROUP}/{VERSION}", "kind": "ZenPool", "name": meta.get("name"),
             "uid": meta.get("uid"), "controller": True, "blockOwnerDeletion": True}] if meta.get("uid") else []


async def _identity(st: State, name: str, body: Mapping[str, Any] | None = None) -> str | None:
    """The digest of the pool's identity certificate if it is current (None: none, or due); with
    ``body``, issued (or renewed) first. The digest goes into the pod template, so a renewed
    identity rolls the ZENs (they read it at start)."""
    secret = f"{_names(st.rel, name)}-tls"
    pem = await pki.current_identity(st.kube, st.cfg, st.ca.root, secret) if body is None else (
        await pki.ensure_identity(st.kube, st.cfg, st.ca.root, secret, f"zen-pool/{name}", owners=_owner(body)))[1]
    return hashlib.sha256(pem).hexdigest()[:16] if pem is not None else None


async def _apply_objects(st: State, name: str, deployment: Obj, bypassed: bool, body: Mapping[str, Any],
                         digest: str) -> None:
    owners = _owner(body)
    dep = copy.deepcopy(deployment)
    dep["metadata"]["ownerReferences"] = owners
    dep["spec"]["template"]["metadata"]["annotations"] = {"keyward.io/identity": digest}
    old = await st.kube.get(path("apps/v1", "deployments", st.cfg.namespace, dep["metadata"]["name"]))
    if old is not None:  # a merge patch keeps what it does not name: drop placement the new spec lacks
        rc.prune_placement(old["spec"]["template"]["spec"], dep["spec"]["template"]["spec"])
    await st.kube.apply("apps/v1", "deployments", dep)
    await _apply_service(st, name, bypassed, owners)


async def _sync_pdb(st: State, name: str, wanted: bool, owners: list[Obj]) -> None:
    """The pool's PodDisruptionBudget, present only while the plan wants it (checked every pass:
    nodes come and go)."""
    pdb = rc.pool_pdb(st.rel, name)
    p = path("policy/v1", "poddisruptionbudgets", st.cfg.namespace, pdb["metadata"]["name"])
    old = await st.kube.get(p)
    if wanted:
        if old is None or old.get("spec", {}).get("maxUnavailable") != pdb["spec"]["maxUnavailable"]:
            pdb["metadata"]["ownerReferences"] = owners
            await st.kube.apply("policy/v1", "poddisruptionbudgets", pdb)
    elif old is not None:
        await st.kube.delete(p)


async def _apply_service(st: State, name: str, bypassed: bool, owners: list[Obj] | None = None) -> None:
    svc = rc.pool_service(st.rel, name, bypassed)
    if owners is not None:
        svc["metadata"]["ownerReferences"] = owners
    old = await st.kube.get(path("v1", "services", st.cfg.namespace, svc["metadata"]["name"]))
    if old is not None:  # a merge patch merges maps: drop the selector keys the new one lacks
        for k in (old.get("spec") or {}).get("selector") or {}:
            svc["spec"]["selector"].setdefault(k, None)
    await st.kube.apply("v1", "services", svc)


async def _ask(st: State, name: str, q: plan.Question) -> plan.Answer:
    """The CA's answer to a planner's question; its failures are answers too."""
    try:
        if isinstance(q, plan.Register):
            pool = await st.ca.register(name, q.visibility, list(q.organizations))
            st.forget_pools()
            return plan.Answer(pool)
        return plan.Answer((await st.ca_pools()).get(name))
    except CAUnavailable as e:
        return plan.Answer(unavailable=str(e))
    except CARefused as e:
        return plan.Answer(refused=str(e))


V = TypeVar("V", plan.SpecView, plan.PoolView)
P = TypeVar("P", plan.SpecPlan, plan.PoolPlan)


async def _decide(st: State, view: V, planner: Callable[[V], P | plan.Question]) -> P:
    """Plan; answer each question the planner asks of the CA, and plan again with the answer."""
    for _ in range(3):
        p = planner(view)
        if not isinstance(p, (plan.AskCA, plan.Register)):
            return p
        view = view.answered(p, await _ask(st, view.name, p))
    raise RuntimeError(f"pool {view.name}: the planner asked the CA more than it may")


async def _post(st: State, body: Obj, events: list[plan.Event]) -> None:
    for e in events:
        await st.kube.event(body, type=e.type, reason=e.reason, message=e.message)


async def _evict(st: State, pod: str) -> str:
    """Evict through the Eviction API; if a PDB blocks it, delete: a private
    pool's key must not stay on a shared node for the sake of availability."""
    ns = st.cfg.namespace
    try:
        await st.kube.create(path("v1", "pods", ns, pod, "eviction"),
                             {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": ns}})
        return "evicted"
    except KubeError as e:
        if e.status not in (429, 404, 405):
            raise
    await st.kube.delete(path("v1", "pods", ns, pod))  # normal grace: a forced delete could leave it running
    return "deleted (eviction refused)"


async def reconcile_pool(st: State, name: str, *, force: bool) -> None:
    """Reconcile one pool from a fresh read, under its lock, and write its status in the same
    critical section, so a timer never acts on a state a change handler has moved past."""
    async with st.lock(name):
        zp = await st.kube.get(path(f"{GROUP}/{VERSION}", PLURAL, st.cfg.namespace, name))
        if zp is None or (zp.get("metadata") or {}).get("deletionTimestamp"):
            return  # gone or going: the delete handler owns it now
        sp: Obj = {}
        try:
            await sync_pool(st, name, zp, sp, force=force)
        finally:
            if sp:
                await st.kube.patch(path(f"{GROUP}/{VERSION}", PLURAL, st.cfg.namespace, name, "status"),
                                    {"status": sp})


async def sync_pool(st: State, name: str, zp: Obj, sp: Obj, *, force: bool) -> None:
    """One pass over a pool: observe, let ``plan`` decide, carry the plan out. Status changes go
    into ``sp`` (a merge patch of ``status``): facts as they happen, conditions once all is done."""
    kube, ns, rel, status = st.kube, st.cfg.namespace, st.rel, dict(zp.get("status") or {})
    nodes = await kube.list(path("v1", "nodes"))
    s = await _decide(st, plan.SpecView(rel, name, dict(zp.get("spec") or {}), status, nodes, await _identity(st, name),
                                        _now(), force, st.cfg.zen_resources_dict()), plan.plan_spec)
    sp.update(s.status)
    await _post(st, zp, s.events)
    if s.deployment is not None:
        digest = s.identity or str(await _identity(st, name, zp))
        await _apply_objects(st, name, s.deployment, bool(status.get("bypass")), zp, digest)
        sp.update(s.applied_status, identity=digest)
        await _post(st, zp, s.applied_events)
    if s.runs is None:
        sp["conditions"] = s.conditions
        return
    ca = await kube.list(path("discovery.k8s.io/v1", "endpointslices", ns),
                         {"kubernetes.io/service-name": f"{rel.name}-ca"})
    p = await _decide(st, plan.PoolView(
        name, s.runs, {**status, **sp, "conditions": s.conditions}, nodes,
        await kube.get(path("apps/v1", "deployments", ns, _names(rel, name))),
        await kube.list(path("v1", "pods", ns), rc.pool_labels(rel, name)), plan.ca_ready(ca), _now(),
        (zp.get("metadata") or {}).get("generation")), plan.plan_pool)
    sp.update(p.status, selector=selector_string(rc.pool_labels(rel, name)))
    await _post(st, zp, p.events)
    await _sync_pdb(st, name, p.pdb, _owner(zp))
    for e in p.evict:
        await _post(st, zp, [e.event(name, await _evict(st, e.pod))])
    if p.switch:  # if switching fails, the status keeps the old value and the next pass retries
        await _apply_service(st, name, p.bypass.on)
        sp["bypass"] = p.bypass.on
        await _post(st, zp, p.switch)
    sp["conditions"] = p.conditions
    metrics.READY_ZENS.labels(name).set(p.ready)
    metrics.BYPASS.labels(name).set(1 if sp["bypass"] else 0)


async def remove_pool(st: State, name: str) -> None:
    ns, n = st.cfg.namespace, _names(st.rel, name)
    await st.kube.delete(path("apps/v1", "deployments", ns, n))
    await st.kube.delete(path("v1", "services", ns, n))
    await st.kube.delete(path("policy/v1", "poddisruptionbudgets", ns, n))
    await st.kube.delete(path("v1", "secrets", ns, f"{n}-tls"))
    await st.ca.deregister(name)
    st.forget_pools()


async def sweep_registrations(st: State) -> list[str]:
    """Deregister every pool the CA knows that has no ZenPool any more.

    ZenPools carry no finalizer: one that waited on the CA would hang `helm uninstall` (the CA
    and the operator leave with the ZenPools) and the namespace with it. Their objects go with
    them through ownerReferences; their CA registration goes here, on the next check after the
    deletion (or, if the CA was down then, once it is back). In a cluster the operator owns pool
    registrations: a pool registered by hand, with no ZenPool, is deregistered too.

    The CA is read first and the ZenPools after, so a pool created in between is seen; a list the
    API cannot serve raises (never "none"); and each candidate is read again under its pool's lock
    just before it is deregistered."""
    known = set(await st.ca.pools())
    live = {p["metadata"]["name"] for p in await st.kube.list(path(f"{GROUP}/{VERSION}", PLURAL, st.cfg.namespace))}
    gone = []
    for name in sorted(known - live):
        async with st.lock(name):
            if await st.kube.get(path(f"{GROUP}/{VERSION}", PLURAL, st.cfg.namespace, name)) is not None:
                continue
            await st.ca.deregister(name)
            gone.append(name)
    if gone:
        st.forget_pools()
    return gone


async def maintain(st: State, logger: logging.Logger) -> None:
    """Every interval, beside the pool checks and the database watch (a slow CA delays neither):
    the platform identities, then stale registrations."""
    while True:
        try:
            await st.tick()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # one failed pass must not end the loop
            logger.warning("maintenance: %s: %s", type(e).__name__, str(e)[:300])
        await asyncio.sleep(st.cfg.interval)


async def check_pools(st: State, logger: logging.Logger) -> None:
    """Every interval, each pool checked again (bypass, eviction, registration, status).

    A loop of the operator's own rather than a kopf timer: kopf puts a finalizer on every object
    a timer serves, and a finalizer left by an operator that is gone (``helm uninstall`` removes
    both at once) hangs the ZenPools and their namespace in Terminating."""
    while True:
        try:
            for zp in await st.kube.list(path(f"{GROUP}/{VERSION}", PLURAL, st.cfg.namespace)):
                name = zp["metadata"]["name"]
                try:
                    await reconcile_pool(st, name, force=False)
                    metrics.RECONCILES.labels("ok").inc()
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # one pool's failure must not stop the others' checks
                    metrics.RECONCILES.labels("error").inc()
                    logger.warning("pool %s: check failed: %s: %s", name, type(e).__name__, str(e)[:300])
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.warning("pool checks: %s: %s", type(e).__name__, str(e)[:300])
        await asyncio.sleep(st.cfg.interval)


def register(registry: kopf.OperatorRegistry, cfg: OperatorConfig) -> None:
    """Attach the handlers to ``registry``, configured by ``cfg``."""

    def ours(namespace: str | None, **_: Any) -> bool:
        # kopf watches cluster-wide; the release's own namespace is the only one served.
        return namespace == cfg.namespace

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        ep = Endpoint.resolve(cfg.kube_api)
        return kopf.ConnectionInfo(server=ep.server, token=ep.token, ca_path=ep.ca_path,
                                   scheme="Bearer" if ep.token else None, default_namespace=cfg.namespace)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger | logging.LoggerAdapter[Any], **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="keyward.io")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="keyward.io", key="last-handled-configuration")
        settings.posting.level = logging.WARNING
        settings.networking.request_timeout = 30
        kube = Kube(Endpoint.resolve(cfg.kube_api))
        root, issued = await pki.ensure_platform(kube, cfg)
        if issued:
            logger.info("platform PKI issued: %s", ", ".join(issued))
        st = State(cfg, kube, CAClient(cfg, root), rc.Release(cfg.release, cfg.namespace, cfg.zen_image,
                                                              cfg.trust_domain, cfg.instance, cfg.secrets))
        memo.state = st
        # The database watch, and the platform identities' renewal even with no ZenPool.
        memo.db_task = asyncio.create_task(dbwatch.run(st.db, cfg, kube, logging.getLogger("keyward.dbwatch")))
        memo.maint_task = asyncio.create_task(maintain(st, logging.getLogger("keyward.maintenance")))
        memo.pool_task = asyncio.create_task(check_pools(st, logging.getLogger("keyward.pools")))

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        for attr in ("db_task", "pool_task", "maint_task"):
            task: asyncio.Task[None] | None = getattr(memo, attr, None)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        st: State | None = getattr(memo, "state", None)
        if st is not None:
            await st.ca.close()
            await st.kube.close()

    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry, when=ours)
    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry, when=ours)
    @kopf.on.update(GROUP, VERSION, PLURAL, field="spec", registry=registry, when=ours)
    async def pool_changed(name: str, memo: kopf.Memo, **_: Any) -> None:
        await reconcile_pool(memo.state, name, force=True)

    # optional: no finalizer (see sweep_registrations); called when kopf sees the deletion at all.
    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry, when=ours, optional=True)
    async def pool_deleted(name: str, memo: kopf.Memo, logger: logging.Logger | logging.LoggerAdapter[Any],
                           **_: Any) -> None:
        try:
            async with memo.state.lock(name):
                await remove_pool(memo.state, name)
        except (CAUnavailable, CARefused, KubeError) as e:
            logger.warning("pool %s: deregistration left to the next sweep: %s", name, e)

