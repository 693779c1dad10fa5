"""Failover with no lost acknowledged write (RPO = 0): the execution.

``dbops.plan`` decides (refuse, or which standby to promote, which servers to
fence, re-point and rejoin); this module observes, asks it, and carries the
plan out:

1. Fence before promoting (at no instant may two servers accept writes): stop
   each fenced server and mark it a standby, so it can never come back as a
   second primary (``local.fence``, or the caller's ``fence`` for servers an
   orchestrator runs).
2. Give the standby to promote its replication slots and ``synchronous_standby_names``
   (still a standby: it is a primary with them from its first instant), promote,
   CHECKPOINT; re-point the other standbys; rejoin the fenced servers through
   pg_rewind (or a fresh clone).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg

from common import failpoints
from dbops import local
from dbops.plan import FailoverPlan, NoFailover, plan_failover
from dbops.spec import ClusterSpec, Node
from dbops.status import cluster_status


class FailoverRefused(RuntimeError):
    """Promoting now could lose an acknowledged write or make two primaries."""


@dataclass
class FailoverReport:
    old_primary: str
    new_primary: str
    promoted_lsn: str
    rejoined: dict[str, str] = field(default_factory=dict)
    steps: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _sql(spec: ClusterSpec, node: Node, *stmts: str) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    with psycopg.connect(spec.conninfo(node, dbname="postgres", timeout=5), autocommit=True) as c:
        for s in stmts:
            cur = c.execute(s)
            if cur.description:
                out.extend(cur.fetchall())
    return out


def configure_primary(spec: ClusterSpec, primary: Node) -> None:
    """Slots for every other node, and the synchronous quorum naming them."""
    for n in spec.nodes:
        if n.name == primary.name:
            continue
        slot = spec.slot(n)
        _sql(spec, primary, f"SELECT pg_create_physical_replication_slot('{slot}', true) "
                            f"WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = '{slot}')")
    _sql(spec, primary, f"ALTER SYSTEM SET synchronous_standby_names = '{spec.sync_names(primary.name)}'",
         "SELECT pg_reload_conf()")


def repoint(spec: ClusterSpec, standby: Node, primary: Node) -> None:
    """Stream from ``primary``. A standby serves no replica of its own, so slots it holds (made
    for a promotion that went to another server) are dropped: they would keep its WAL forever."""
    conninfo = spec.replication_conninfo(primary, standby.name).replace("'", "''")
    _sql(spec, standby, f"ALTER SYSTEM SET primary_conninfo = '{conninfo}'",
         f"ALTER SYSTEM SET primary_slot_name = '{spec.slot(standby)}'", "SELECT pg_reload_conf()",
         "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE NOT active")


def failover(
    spec: ClusterSpec,
    *,
    force_fence: bool = False,
    rejoin: bool = True,
    fence: Callable[[Node, Node], None] | None = None,
) -> FailoverReport:
    """Observe, plan (``dbops.plan``), execute; FailoverRefused when the plan is no failover."""
    t0 = time.monotonic()
    plan = plan_failover(spec, cluster_status(spec), force_fence=force_fence, rejoin=rejoin)
    if isinstance(plan, NoFailover):
        raise FailoverRefused(plan.reason)
    return execute(spec, plan, fence=fence, started=t0)


def execute(spec: ClusterSpec, plan: FailoverPlan, *, fence: Callable[[Node, Node], None] | None = None,
            started: float | None = None) -> FailoverReport:
    """Carry out ``plan``. ``fence(node, new_primary)`` fences one server (default: ``local.fence``,
    for servers whose files are at hand)."""
    t0 = time.monotonic() if started is None else started
    new = plan.promote
    rep = FailoverReport(old_primary=plan.old_primary.name if plan.old_primary else "?", new_primary=new.name,
                         promoted_lsn=plan.at_lsn)
    rep.steps.append(f"old primary: {plan.old_primary.name} ({plan.old_primary_by})" if plan.old_primary
                     else f"old primary unknown ({plan.old_primary_by}); every server down is fenced")
    fencer = fence or (lambda n, p: local.fence(spec, n, p))
    for n in plan.fence:
        try:
            fencer(n, new)
            rep.steps.append(f"fenced {n.name}")
        except Exception as e:  # remote node: its orchestrator must fence it
            if n.name in plan.must_fence:
                raise FailoverRefused(f"cannot fence live primary {n.name}: {e}") from e
            rep.steps.append(f"could not fence {n.name} locally ({e}); it is down and must stay down")
    failpoints.point("dbops.failover.fenced")

    # Configured while still a standby, so that it is a primary with its quorum and its slots from
    # its first instant: promoted first, it acknowledged writes alone (a standby's empty
    # synchronous_standby_names) until configured, and with no slot yet its first WAL segment on
    # the new timeline could be removed before the others streamed it ("requested WAL segment ...
    # has already been removed", the campaign's seed 1130: a watcher killed in between).
    configure_primary(spec, new)
    rep.steps.append(f"{new.name}: slots + synchronous_standby_names = {spec.sync_names(new.name)}")
    failpoints.point("dbops.failover.configured")
    # The CHECKPOINT writes the new timeline into pg_control, which pg_rewind
    # reads from the source; without it a rewind wrongly finds "same timeline".
    _sql(spec, new, "SELECT pg_promote(true, 60)", "CHECKPOINT")
    rep.steps.append(f"promoted {new.name} at {plan.at_lsn}")
    failpoints.point("dbops.failover.promoted")
    for n in plan.repoint:
        repoint(spec, n, new)
        rep.steps.append(f"re-pointed {n.name} at {new.name}")
    failpoints.point("dbops.failover.repointed")
    for n in plan.rejoin:
        how = local.rejoin(spec, n, new)
        rep.rejoined[n.name] = how
        rep.steps.append(f"rejoined {n.name} as a standby ({how})")
    rep.seconds = time.monotonic() - t0
    return rep
