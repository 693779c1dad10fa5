"""Failover with no lost acknowledged write (RPO = 0).

Rules:

1. Refuse while any node answers as primary (that is a switchover, or a
   split brain to fence first), unless the caller asks to fence it.
2. Refuse unless enough standbys answer to be sure one holds every
   acknowledged write: with ``ANY k`` of ``s`` standbys, any ``s - k + 1``
   of them include one of every commit's k confirmers (k = 2 of 2: one is
   enough; k = 1 of 2: both must answer).
3. Promote the standby that has received the most WAL.
4. Fence the old primary (stop it, mark it a standby) so it can never come
   back as a second primary; then give the new primary its replication slots
   and ``synchronous_standby_names``, re-point the other standby, and rejoin
   the old primary through pg_rewind (or a fresh clone).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg

from dbops import local
from dbops.spec import ClusterSpec, Node
from dbops.status import NodeStatus, cluster_status


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


def standbys_needed(spec: ClusterSpec) -> int:
    s = len(spec.nodes) - 1
    return s - spec.required_sync + 1


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
    conninfo = spec.replication_conninfo(primary, standby.name).replace("'", "''")
    _sql(spec, standby, f"ALTER SYSTEM SET primary_conninfo = '{conninfo}'",
         f"ALTER SYSTEM SET primary_slot_name = '{spec.slot(standby)}'", "SELECT pg_reload_conf()")


def failover(
    spec: ClusterSpec,
    *,
    force_fence: bool = False,
    rejoin: bool = True,
    fence: Callable[[Node, Node], None] | None = None,
) -> FailoverReport:
    t0 = time.monotonic()
    sts = cluster_status(spec)
    primaries = [s for s in sts if s.reachable and s.role == "primary"]
    standbys = [s for s in sts if s.reachable and s.role == "standby"]
    down = [s for s in sts if not s.reachable]
    if primaries and not force_fence:
        raise FailoverRefused(
            f"{', '.join(p.node.name for p in primaries)} answers as primary; a failover now would make two. "
            "Stop it first, or pass --fence to fence it as part of the failover")
    need = standbys_needed(spec)
    if len(standbys) < need:
        raise FailoverRefused(
            f"only {len(standbys)} standby(s) answer; {need} are needed to be sure one holds every "
            f"acknowledged write (ANY {spec.required_sync} of {len(spec.nodes) - 1}). Bring a standby back "
            "or restore from backup")
    best: NodeStatus = max(standbys, key=lambda s: s.lsn_int)
    new = best.node
    # The old primary: a node that the standbys streamed from, else any node down.
    ports = {s.upstream.rsplit(":", 1)[-1] for s in standbys if s.upstream}
    old_candidates = [s.node for s in down + primaries if str(s.node.port) in ports] or [s.node for s in down + primaries]
    old = old_candidates[0] if old_candidates else None
    rep = FailoverReport(old_primary=old.name if old else "?", new_primary=new.name, promoted_lsn=best.lsn)

    # Fence before promoting: at no instant may two servers accept writes.
    fencer = fence or (lambda n, p: local.fence(spec, n, p))
    for s in down + primaries:
        if s.node.name == new.name:
            continue
        try:
            fencer(s.node, new)
            rep.steps.append(f"fenced {s.node.name}")
        except Exception as e:  # remote node: its orchestrator must fence it
            if s in primaries:
                raise FailoverRefused(f"cannot fence live primary {s.node.name}: {e}") from e
            rep.steps.append(f"could not fence {s.node.name} locally ({e}); it is down and must stay down")

    # The CHECKPOINT writes the new timeline into pg_control, which pg_rewind
    # reads from the source; without it a rewind wrongly finds "same timeline".
    _sql(spec, new, "SELECT pg_promote(true, 60)", "CHECKPOINT")
    rep.steps.append(f"promoted {new.name} at {best.lsn}")
    configure_primary(spec, new)
    rep.steps.append(f"{new.name}: slots + synchronous_standby_names = {spec.sync_names(new.name)}")
    for s in standbys:
        if s.node.name != new.name:
            repoint(spec, s.node, new)
            rep.steps.append(f"re-pointed {s.node.name} at {new.name}")
    if rejoin:
        for s in down + primaries:
            if s.node.name == new.name or not s.node.datadir:
                continue
            how = local.rejoin(spec, s.node, new)
            rep.rejoined[s.node.name] = how
            rep.steps.append(f"rejoined {s.node.name} as a standby ({how})")
    rep.seconds = time.monotonic() - t0
    return rep
