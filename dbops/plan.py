"""Failover decisions as plain data: what ``dbops.status`` observed in, a plan out.

Nothing here connects to a server or touches a file: the callers observe
(``status.cluster_status``), call a planner, and execute what it returns.
One decision module for every driver of a failover: ``keyward db failover``
(``dbops.failover``), the Kubernetes operator's trigger (``k8s/operator/dbwatch``)
and a local watch agent all decide through :func:`watch` and :func:`plan_failover`.

The rules (RPO = 0; see ``dbops.failover`` and docs/database.md):

1. No failover while any server answers as primary (that is a switchover, or
   a split brain to fence first), unless the caller asks to fence it.
2. No failover unless enough standbys answer to be sure one holds every
   acknowledged write: with ``ANY k`` of ``s`` standbys, any ``s - k + 1`` of
   them include one of every commit's k confirmers.
3. Promote the standby that has received the most WAL; ties go to the newer
   timeline, then to the server listed first in the cluster spec.
4. Fence every server that is down or still answers as primary (any of them
   could be the old primary, frozen or partitioned rather than dead), the old
   primary first; re-point the other standbys; rejoin the fenced servers whose
   data directory is at hand.

The old primary is identified by its identity in the cluster spec: the host
(and port) a standby streamed from, or the server the caller last saw as
primary; never by the port alone (in Kubernetes every server listens on 5432).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dbops.spec import ClusterSpec, Node
from dbops.status import NodeStatus


@dataclass(frozen=True)
class FailoverPlan:
    promote: Node
    at_lsn: str
    """The WAL the promoted standby had received (its last received LSN)."""
    old_primary: Node | None
    """The server that was primary, when the observations identify it (``None``: unknown)."""
    old_primary_by: str
    """How it was identified (a standby's upstream, the last primary seen, the only server down) or why not."""
    fence: tuple[Node, ...]
    """Fenced before the promotion, in this order (the old primary first): every server down or
    answering as primary, except the one promoted."""
    must_fence: tuple[str, ...]
    """Names of the live primaries among them (a forced failover): if one cannot be fenced the failover stops."""
    repoint: tuple[Node, ...]
    """The other reachable standbys, re-pointed at the new primary."""
    rejoin: tuple[Node, ...]
    """Fenced servers with a data directory at hand, brought back as standbys of the new primary."""


@dataclass(frozen=True)
class NoFailover:
    """Promoting now could lose an acknowledged write or make two primaries."""

    reason: str


def standbys_needed(spec: ClusterSpec) -> int:
    """Standbys that must answer to be sure one holds every acknowledged write."""
    s = len(spec.nodes) - 1
    return s - spec.required_sync + 1


def _host_port(addr: str) -> tuple[str, int | None]:
    host, _, port = addr.rpartition(":")
    if not host:
        return addr, None
    return host.strip("[]"), int(port) if port.isdigit() else None


def same_host(a: str, b: str) -> bool:
    """Two names of one host: equal, or one is the other plus a DNS search suffix
    (``pg-0.pg`` and ``pg-0.pg.keyward.svc``; never ``pg-1`` and ``pg-10``)."""
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def upstream_node(nodes: Sequence[Node], upstream: str) -> Node | None:
    """The node of the cluster spec a standby's ``host:port`` upstream names, by host and port
    together: ``None`` if no node, or more than one, answers to it."""
    host, port = _host_port(upstream)
    if not host:
        return None
    hits = [n for n in nodes if same_host(n.host, host) and (port is None or n.port == port)]
    exact = [n for n in hits if n.host.lower() == host.lower()]
    if len(exact) == 1:
        return exact[0]
    return hits[0] if len(hits) == 1 else None


def _old_primary(candidates: Sequence[NodeStatus], standbys: Sequence[NodeStatus], nodes: Sequence[Node],
                 last_primary: str | None) -> tuple[Node | None, str]:
    names = {s.node.name for s in candidates}
    streamed = {n.name: n for s in standbys if s.upstream
                for n in [upstream_node(nodes, s.upstream)] if n is not None and n.name in names}
    if len(streamed) == 1:
        n = next(iter(streamed.values()))
        return n, f"the standbys streamed from {n.host}:{n.port}"
    live = [s.node for s in candidates if s.reachable and s.role == "primary"]
    if len(live) == 1:
        return live[0], "it still answers as primary"
    if last_primary in names:
        return next(s.node for s in candidates if s.node.name == last_primary), "the last server seen as primary"
    if len(candidates) == 1:
        return candidates[0].node, "the only server not answering as a standby"
    if len(streamed) > 1:
        return None, f"the standbys streamed from different servers ({', '.join(sorted(streamed))})"
    return None, "no standby names the server it streamed from, and no primary was seen before"


def plan_failover(spec: ClusterSpec, observed: Sequence[NodeStatus], *, force_fence: bool = False,
                  rejoin: bool = True, last_primary: str | None = None) -> FailoverPlan | NoFailover:
    """The failover the observations call for, or why there must be none.

    ``observed``: ``status.cluster_status(spec)``, one per node. ``force_fence``: fence servers
    that still answer as primary instead of refusing. ``rejoin``: bring the fenced servers back as
    standbys where their data directory is at hand. ``last_primary``: the server the caller last
    saw answering as primary (its name in the spec), when it knows."""
    primaries = [s for s in observed if s.reachable and s.role == "primary"]
    standbys = [s for s in observed if s.reachable and s.role == "standby"]
    down = [s for s in observed if not s.reachable]
    if primaries and not force_fence:
        return NoFailover(
            f"{', '.join(p.node.name for p in primaries)} answers as primary; a failover now would make two. "
            "Stop it first, or pass --fence to fence it as part of the failover")
    need = standbys_needed(spec)
    if len(standbys) < need:
        return NoFailover(
            f"only {len(standbys)} standby(s) answer; {need} are needed to be sure one holds every "
            f"acknowledged write (ANY {spec.required_sync} of {len(spec.nodes) - 1}). Bring a standby back "
            "or restore from backup")
    order = {n.name: i for i, n in enumerate(spec.nodes)}
    best = min(standbys, key=lambda s: (-s.lsn_int, -s.timeline, order.get(s.node.name, len(order))))
    new = best.node
    candidates = [s for s in down + primaries if s.node.name != new.name]
    old, why = _old_primary(candidates, standbys, spec.nodes, last_primary)
    fence = sorted((s.node for s in candidates),
                   key=lambda n: (old is None or n.name != old.name, order.get(n.name, len(order))))
    return FailoverPlan(
        promote=new, at_lsn=best.lsn, old_primary=old, old_primary_by=why, fence=tuple(fence),
        must_fence=tuple(s.node.name for s in primaries if s.node.name != new.name),
        repoint=tuple(s.node for s in standbys if s.node.name != new.name),
        rejoin=tuple(n for n in fence if n.datadir) if rejoin else ())


# The trigger: when a watcher (the operator, a local watch agent) fails over.

@dataclass(frozen=True)
class Healthy:
    """One server answers as primary: keep roles in step with it."""

    primary: str
    back: bool
    """It returns after having been missing (``lost_since`` was set)."""


@dataclass(frozen=True)
class SplitBrain:
    """More than one server answers as primary: no automatic action; a person fences all but one."""

    primaries: tuple[str, ...]


@dataclass(frozen=True)
class Waiting:
    """No primary answers, and it is not yet time to fail over (or nothing was ever lost)."""

    lost_since: float | None
    """When the primary was first found missing (the watcher keeps this); None: nothing is lost."""
    newly_lost: bool = False
    """Found missing just now: report it (``PrimaryLost``)."""


Verdict = Healthy | SplitBrain | Waiting | FailoverPlan | NoFailover


def watch(spec: ClusterSpec, observed: Sequence[NodeStatus], *, last_primary: str | None, lost_since: float | None,
          now: float, after: float, rejoin: bool = True) -> Verdict:
    """One look of a watcher at the servers: what to do now.

    ``last_primary``: the server last seen answering as primary, kept by the watcher across its
    restarts (None: never one, a fresh install still starting: nothing counts as lost).
    ``lost_since``/``now``: the watcher's clock (monotonic); the failover is due once no primary has
    answered for ``after`` seconds. When due, the verdict is :func:`plan_failover`'s."""
    primaries = tuple(s.node.name for s in observed if s.reachable and s.role == "primary")
    if len(primaries) == 1:
        return Healthy(primaries[0], back=lost_since is not None)
    if len(primaries) > 1:
        return SplitBrain(primaries)
    if not last_primary:
        return Waiting(None)
    if lost_since is None:
        return Waiting(now, newly_lost=True)
    if now - lost_since < after:
        return Waiting(lost_since)
    return plan_failover(spec, observed, rejoin=rejoin, last_primary=last_primary)


@dataclass(frozen=True)
class Converge:
    """What brings the servers back in step with the one primary after a failover that did not
    finish (its watcher killed between two steps): each part is safe to do again."""

    configure: bool
    """The primary's ``synchronous_standby_names`` are not the spec's (promoted, not configured:
    it may acknowledge writes no standby holds, or none at all)."""
    repoint: tuple[Node, ...]
    """Standbys whose ``primary_conninfo`` names another server than the primary."""
    rejoin: tuple[Node, ...]
    """Servers the unfinished failover fenced and did not bring back (still down)."""

    def __bool__(self) -> bool:
        return self.configure or bool(self.repoint) or bool(self.rejoin)


def converge(spec: ClusterSpec, observed: Sequence[NodeStatus], primary: str,
             unfinished: Sequence[str] = ()) -> Converge:
    """The repairs a watcher does while ``primary`` is the one primary. ``unfinished``: the
    servers a failover the watcher began was to rejoin (its durable memory); a server down for
    any other reason is not the watcher's to start."""
    by_name = {s.node.name: s for s in observed}
    p = by_name[primary]
    want = " ".join(spec.sync_names(primary).split())
    configure = p.reachable and " ".join(p.sync_names.split()) != want
    repoint = tuple(s.node for s in observed if s.reachable and s.role == "standby" and s.source
                    and (n := upstream_node(spec.nodes, s.source)) is not None and n.name != primary)
    rejoin = tuple(by_name[n].node for n in unfinished
                   if n in by_name and n != primary and not by_name[n].reachable and by_name[n].node.datadir)
    return Converge(configure, repoint, rejoin)
