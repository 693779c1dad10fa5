"""The database failover driver: the I/O shell around ``dbops.plan``.

Every interval the operator asks each Postgres server its role (real SQL)
and ``dbops.plan.watch`` decides what to do (the one decision module, shared
with ``keyward db failover`` and a local watch agent). While one server
answers as primary, the pods' role labels and the role ConfigMap
(``<release>-postgres-role``, read by the servers' start script) are kept
in step with it. When none has answered as primary for ``failover_after``
seconds, the plan is carried out by ``dbops.failover.execute``: fence the
old primary (role ConfigMap first, so a restart comes back as a standby;
then its pod is deleted), promote the standby with the most WAL, re-point
the other. A refusal (too few standbys to be sure no write is lost) is
reported as an Event and retried; it is never forced.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbops import local
from dbops import plan as dbplan
from dbops.failover import FailoverRefused, execute
from dbops.spec import ClusterSpec, Node
from dbops.status import cluster_status
from k8s.operator import metrics
from k8s.operator.config import OperatorConfig
from k8s.operator.kube import Kube, KubeError, Obj, path

ROLE_LABEL = "keyward.io/pg-role"


class DbWatchError(RuntimeError):
    """This look at the database failed; the loop reports it and looks again next interval."""


@dataclass
class DbWatch:
    lost_since: float | None = None
    """monotonic time the primary was first found missing (None: it answers)."""
    last_refusal: str = ""
    spec: ClusterSpec | None = None


async def cluster(w: DbWatch, cfg: OperatorConfig, kube: Kube) -> ClusterSpec:
    """From KEYWARD_PG_CLUSTER_FILE, or the chart's StatefulSet and passwords Secret."""
    if w.spec is not None:
        return w.spec
    if cfg.pg_cluster_file:
        w.spec = ClusterSpec.load(cfg.pg_cluster_file)
        return w.spec
    sec = await kube.get(path("v1", "secrets", cfg.namespace, cfg.secrets))
    if sec is None:
        raise DbWatchError(f"Secret {cfg.secrets} not found (the chart creates it, or names "
                           "secrets.existingSecret)")
    pw = {k: base64.b64decode(v).decode() for k, v in (sec.get("data") or {}).items()
          if k in ("postgres-password", "replication-password")}
    passfile = Path(os.environ.get("TMPDIR", "/tmp")) / "keyward-operator-pgpass"  # /tmp is a memory volume
    fd = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"*:*:*:postgres:{pw.get('postgres-password', '')}\n"
                f"*:*:*:replicator:{pw.get('replication-password', '')}\n")
    pg = cfg.pg_name
    w.spec = ClusterSpec(nodes=tuple(Node(f"{pg}-{i}", f"{pg}-{i}.{pg}.{cfg.namespace}.svc", 5432) for i in range(3)),
                         passfile=str(passfile), dbname="keyward", app_user="keyward",
                         required_sync=cfg.pg_required_sync,
                         server_passfile="/tmp/pgpass")  # what the chart's start script writes in each pod
    return w.spec


async def _set_primary(cfg: OperatorConfig, kube: Kube, primary: str) -> None:
    await kube.apply("v1", "configmaps", {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": f"{cfg.pg_name}-role", "namespace": cfg.namespace,
                     "labels": {"app.kubernetes.io/name": "keyward", "app.kubernetes.io/component": "postgres",
                                "app.kubernetes.io/managed-by": "keyward-operator"}},
        "data": {"primary": primary}})


async def repair_roles(cfg: OperatorConfig, kube: Kube, spec: ClusterSpec, primary: str) -> list[str]:
    """Role ConfigMap and pod labels match the server that answers as primary."""
    changed = []
    cm = await kube.get(path("v1", "configmaps", cfg.namespace, f"{cfg.pg_name}-role"))
    if cm is None or (cm.get("data") or {}).get("primary") != primary:
        await _set_primary(cfg, kube, primary)
        changed.append(f"role ConfigMap: primary={primary}")
    names = {n.name for n in spec.nodes}
    pods: list[Obj] = await kube.list(path("v1", "pods", cfg.namespace), {"app.kubernetes.io/component": "postgres"})
    for p in pods:
        n = p["metadata"]["name"]
        if n not in names:
            continue
        role = "primary" if n == primary else "standby"
        if (p["metadata"].get("labels") or {}).get(ROLE_LABEL) != role:
            await kube.patch(path("v1", "pods", cfg.namespace, n), {"metadata": {"labels": {ROLE_LABEL: role}}})
            changed.append(f"{n}: {role}")
    return changed


async def fence_pod(cfg: OperatorConfig, kube: Kube, node: Node, new_primary: Node) -> None:
    """Point the role at the new primary first, then delete the old primary's pod. With its normal
    grace period, not forced: the StatefulSet then starts no replacement while the old one may still
    run on an unreachable node (two postmasters on one volume)."""
    await _set_primary(cfg, kube, new_primary.name)
    try:
        await kube.delete(path("v1", "pods", cfg.namespace, node.name))
    except KubeError as e:
        if e.status != 404:
            raise


async def _annotate(cfg: OperatorConfig, kube: Kube, body: Any, primary: str) -> None:
    if (body.get("metadata", {}).get("annotations") or {}).get("keyward.io/primary") != primary:
        await kube.patch(path("apps/v1", "statefulsets", cfg.namespace, cfg.pg_name),
                         {"metadata": {"annotations": {"keyward.io/primary": primary}}})


async def _refused(w: DbWatch, kube: Kube, body: Any, reason: str) -> None:
    metrics.FAILOVERS.labels("refused").inc()
    if reason != w.last_refusal:  # reported once per reason, not every check
        w.last_refusal = reason
        await kube.event(body, type="Warning", reason="FailoverRefused", message=reason)


async def check(w: DbWatch, cfg: OperatorConfig, kube: Kube, body: Any,
                logger: logging.Logger | logging.LoggerAdapter[Any]) -> None:
    """One look at the servers; ``body`` is the Postgres StatefulSet (Events go to it)."""
    spec = await cluster(w, cfg, kube)
    sts = await asyncio.to_thread(cluster_status, spec)
    # The last primary seen: an annotation, so it outlives operator restarts (a primary lost while
    # no operator ran still counts), and nothing is lost before one was ever seen (a fresh install).
    seen = (body.get("metadata", {}).get("annotations") or {}).get("keyward.io/primary")
    v = dbplan.watch(spec, sts, last_primary=seen, lost_since=w.lost_since, now=time.monotonic(),
                     after=cfg.failover_after, rejoin=any(n.datadir for n in spec.nodes))
    metrics.PRIMARY_UP.set(1 if isinstance(v, dbplan.Healthy) else 0)
    if isinstance(v, dbplan.Healthy):
        if v.back:
            await kube.event(body, type="Normal", reason="PrimaryBack", message=f"{v.primary} answers as primary again")
        w.lost_since, w.last_refusal = None, ""
        for c in await repair_roles(cfg, kube, spec, v.primary):
            logger.info("role repaired: %s", c)
        await _annotate(cfg, kube, body, v.primary)
    elif isinstance(v, dbplan.SplitBrain):
        await kube.event(body, type="Warning", reason="SplitBrain",
                         message=f"{', '.join(v.primaries)} all answer as primary: no automatic action; "
                                 "fence all but one")
    elif isinstance(v, dbplan.Waiting):
        w.lost_since = v.lost_since
        if v.newly_lost:
            await kube.event(body, type="Warning", reason="PrimaryLost",
                             message=f"no Postgres server answers as primary; failing over in {cfg.failover_after:g}s "
                                     "unless one returns")
    elif isinstance(v, dbplan.NoFailover):
        await _refused(w, kube, body, v.reason)
    else:
        await _fail_over(w, cfg, kube, body, spec, v)


async def _fail_over(w: DbWatch, cfg: OperatorConfig, kube: Kube, body: Any, spec: ClusterSpec,
                     plan: dbplan.FailoverPlan) -> None:
    loop = asyncio.get_running_loop()

    def fence(node: Node, new: Node) -> None:  # runs in the failover's thread
        asyncio.run_coroutine_threadsafe(fence_pod(cfg, kube, node, new), loop).result(timeout=60)
        if node.datadir:  # the server runs beside us (local stack, tests): stop it for real too
            local.fence(spec, node, new)

    try:
        rep = await asyncio.to_thread(execute, spec, plan, fence=fence)
    except FailoverRefused as e:
        await _refused(w, kube, body, str(e))
        return
    except Exception as e:  # a server died mid-way: report, and start over from fresh status next time
        metrics.FAILOVERS.labels("error").inc()
        await kube.event(body, type="Warning", reason="FailoverFailed",
                   message=f"failover stopped part-way ({type(e).__name__}: {str(e)[:300]}); retrying from the "
                           "servers' current state")
        raise DbWatchError(f"failover failed: {e}") from e
    w.lost_since, w.last_refusal = None, ""
    metrics.FAILOVERS.labels("done").inc()
    await kube.event(body, type="Normal", reason="FailedOver",
               message=f"{rep.old_primary} -> {rep.new_primary} at {rep.promoted_lsn} in {rep.seconds:.1f}s: "
                       + "; ".join(rep.steps))
    await repair_roles(cfg, kube, spec, rep.new_primary)
    await _annotate(cfg, kube, body, rep.new_primary)


async def run(w: DbWatch, cfg: OperatorConfig, kube: Kube, logger: logging.Logger,
              tick: Callable[[], Awaitable[None]] | None = None) -> None:
    """The watch loop, a task of the operator's own (not a kopf timer on the StatefulSet: that
    would put a finalizer on it and block `helm uninstall` once the operator is gone)."""
    while True:
        try:
            if tick is not None:
                await tick()
            sts = await kube.get(path("apps/v1", "statefulsets", cfg.namespace, cfg.pg_name))
            if sts is not None:
                await check(w, cfg, kube, sts, logger)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # keep watching: one failed look must not end the loop
            logger.warning("database check failed: %s: %s", type(e).__name__, str(e)[:300])
        await asyncio.sleep(cfg.interval)  # the check period
