"""dbops.plan: the failover decision as plain data (no server, no file)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dbops.plan import (
    FailoverPlan,
    Healthy,
    NoFailover,
    SplitBrain,
    Waiting,
    converge,
    plan_failover,
    same_host,
    upstream_node,
    watch,
)
from dbops.spec import ClusterSpec, Node
from dbops.status import NodeStatus

# As the operator derives the chart's cluster: three servers, every one on port 5432.
K8S = ClusterSpec(nodes=tuple(Node(f"pg-{i}", f"pg-{i}.pg.keyward.svc", 5432) for i in range(3)), passfile="/p")
# As `make up` runs it: one host, three ports, data directories at hand.
LOCAL = ClusterSpec(nodes=tuple(Node(f"n{i}", "127.0.0.1", 5433 + i, f"/d/n{i}") for i in range(3)), passfile="/p")


def down(spec: ClusterSpec, name: str) -> NodeStatus:
    return NodeStatus(spec.node(name), False, error="connection refused")


def standby(spec: ClusterSpec, name: str, lsn: int, upstream: str = "", timeline: int = 1) -> NodeStatus:
    return NodeStatus(spec.node(name), True, role="standby", timeline=timeline, lsn=f"0/{lsn:X}", lsn_int=lsn,
                      upstream=upstream, streaming=False)


def primary(spec: ClusterSpec, name: str) -> NodeStatus:
    return NodeStatus(spec.node(name), True, role="primary", timeline=1, lsn="0/100", lsn_int=0x100)


def plan(spec: ClusterSpec, observed: list[NodeStatus], *, force_fence: bool = False, rejoin: bool = True,
         last_primary: str | None = None) -> FailoverPlan:
    p = plan_failover(spec, observed, force_fence=force_fence, rejoin=rejoin, last_primary=last_primary)
    assert isinstance(p, FailoverPlan), p
    return p


def names(nodes: tuple[Node, ...]) -> list[str]:
    return [n.name for n in nodes]


def test_the_old_primary_is_found_by_host_when_every_server_listens_on_5432() -> None:
    """pg-0 (a standby) and pg-1 (the primary) are down; pg-2 streamed from pg-1, named as the
    chart's start script names it (short DNS name, port 5432). Guessing by port matched every
    server and took the first one down, pg-0."""
    observed = [down(K8S, "pg-0"), down(K8S, "pg-1"), standby(K8S, "pg-2", 0x500, "pg-1.pg:5432")]
    p = plan(K8S, observed)
    assert p.promote.name == "pg-2" and p.at_lsn == "0/500"
    assert p.old_primary is not None and p.old_primary.name == "pg-1", p
    assert "streamed from pg-1.pg.keyward.svc:5432" in p.old_primary_by
    assert names(p.fence) == ["pg-1", "pg-0"]  # every server down is fenced, the old primary first
    assert p.repoint == () and p.must_fence == ()
    # After a failover the tools re-point standbys with the spec's own (full) name: the same server.
    observed = [down(K8S, "pg-0"), standby(K8S, "pg-1", 0x600, "pg-2.pg.keyward.svc:5432"), down(K8S, "pg-2")]
    p = plan(K8S, observed)
    assert p.promote.name == "pg-1" and p.old_primary == K8S.node("pg-2")


def test_the_old_primary_on_one_host_is_found_by_port() -> None:
    observed = [standby(LOCAL, "n0", 0x700, "127.0.0.1:5435"), down(LOCAL, "n1"), down(LOCAL, "n2")]
    p = plan(LOCAL, observed)
    assert p.old_primary == LOCAL.node("n2") and names(p.fence) == ["n2", "n1"]
    assert names(p.rejoin) == ["n2", "n1"]  # their data directories are at hand
    assert plan(LOCAL, observed, rejoin=False).rejoin == ()


@pytest.mark.parametrize("observed, last, want, why", [
    # No standby names its upstream (the receivers stopped): the server last seen as primary.
    ([down(K8S, "pg-0"), down(K8S, "pg-1"), standby(K8S, "pg-2", 9)], "pg-1", "pg-1", "last server seen"),
    # Only one server is not a standby: that one.
    ([standby(K8S, "pg-0", 9), down(K8S, "pg-1"), standby(K8S, "pg-2", 9)], None, "pg-1", "only server"),
    # An upstream no server of the spec answers to (an IP): not guessed.
    ([down(K8S, "pg-0"), down(K8S, "pg-1"), standby(K8S, "pg-2", 9, "10.0.0.7:5432")], None, None, "no standby"),
    # The evidence of a standby's upstream outweighs the caller's memory.
    ([down(K8S, "pg-0"), down(K8S, "pg-1"), standby(K8S, "pg-2", 9, "pg-0.pg:5432")], "pg-1", "pg-0", "streamed"),
])
def test_the_old_primary_is_named_only_on_evidence(observed: list[NodeStatus], last: str | None,
                                                   want: str | None, why: str) -> None:
    p = plan(K8S, observed, last_primary=last)
    assert (p.old_primary.name if p.old_primary else None) == want and why in p.old_primary_by, p
    assert {n.name for n in p.fence} == {s.node.name for s in observed if not s.reachable}


def test_the_most_advanced_standby_is_promoted_ties_broken_by_timeline_then_spec_order() -> None:
    up = "pg-0.pg:5432"
    p = plan(K8S, [down(K8S, "pg-0"), standby(K8S, "pg-1", 0x10, up), standby(K8S, "pg-2", 0x20, up)])
    assert p.promote.name == "pg-2" and names(p.repoint) == ["pg-1"] and names(p.fence) == ["pg-0"]
    tie = [down(K8S, "pg-0"), standby(K8S, "pg-2", 0x20, up), standby(K8S, "pg-1", 0x20, up)]
    assert plan(K8S, tie).promote.name == "pg-1"  # listed first in the spec, whatever the observation order
    tie[1] = replace(tie[1], timeline=2)
    assert plan(K8S, tie).promote.name == "pg-2"


@pytest.mark.parametrize("spec, observed, reason", [
    (K8S, [primary(K8S, "pg-0"), standby(K8S, "pg-1", 1), standby(K8S, "pg-2", 1)], "pg-0 answers as primary"),
    (K8S, [down(K8S, "pg-0"), down(K8S, "pg-1"), down(K8S, "pg-2")], "only 0 standby(s) answer; 1 are needed"),
    # ANY 1 of 2: a commit may be on one standby only, so both must answer.
    (replace(K8S, required_sync=1), [down(K8S, "pg-0"), down(K8S, "pg-1"), standby(K8S, "pg-2", 1)],
     "only 1 standby(s) answer; 2 are needed"),
    # A standby promoted behind keyward's back: two primaries; never made worse.
    (K8S, [primary(K8S, "pg-0"), standby(K8S, "pg-1", 1), primary(K8S, "pg-2")], "pg-0, pg-2 answers as primary"),
])
def test_refusals(spec: ClusterSpec, observed: list[NodeStatus], reason: str) -> None:
    p = plan_failover(spec, observed)
    assert isinstance(p, NoFailover) and reason in p.reason, p


def test_a_forced_failover_fences_the_live_primary_and_must_succeed_at_it() -> None:
    observed = [primary(K8S, "pg-0"), standby(K8S, "pg-1", 0x90, "pg-0.pg:5432"), down(K8S, "pg-2")]
    p = plan(K8S, observed, force_fence=True)
    assert p.promote.name == "pg-1" and p.old_primary == K8S.node("pg-0")
    assert names(p.fence) == ["pg-0", "pg-2"] and p.must_fence == ("pg-0",)


@pytest.mark.parametrize("a, b, same", [
    ("pg-1.pg", "pg-1.pg.keyward.svc", True), ("PG-1.pg.keyward.svc.", "pg-1.pg.keyward.svc", True),
    ("pg-1", "pg-10", False), ("pg-1.pg", "pg-10.pg", False), ("127.0.0.1", "127.0.0.1", True),
])
def test_same_host(a: str, b: str, same: bool) -> None:
    assert same_host(a, b) is same and same_host(b, a) is same


def test_upstream_node() -> None:
    assert upstream_node(K8S.nodes, "pg-2.pg:5432") == K8S.node("pg-2")
    assert upstream_node(K8S.nodes, "pg-2.pg:5433") is None  # the port must match too
    assert upstream_node(LOCAL.nodes, "127.0.0.1:5434") == LOCAL.node("n1")
    assert upstream_node(LOCAL.nodes, "localhost:5434") is None and upstream_node(K8S.nodes, "") is None
    # Two servers answering to one name (a bare "pg" prefix of both): not guessed.
    assert upstream_node((Node("a", "pg.x", 5432), Node("b", "pg.y", 5432)), "pg:5432") is None


def look(observed: list[NodeStatus], lost_since: float | None, last_primary: str | None = "pg-0") -> object:
    return watch(K8S, observed, last_primary=last_primary, lost_since=lost_since, now=100.0, after=30.0)


def test_watch() -> None:
    ok = [primary(K8S, "pg-0"), standby(K8S, "pg-1", 1), standby(K8S, "pg-2", 1)]
    lost = [down(K8S, "pg-0"), standby(K8S, "pg-1", 5, "pg-0.pg:5432"), standby(K8S, "pg-2", 7, "pg-0.pg:5432")]
    assert look(ok, None) == Healthy("pg-0", back=False)
    assert look(ok, 90.0) == Healthy("pg-0", back=True)
    assert look([primary(K8S, "pg-0"), primary(K8S, "pg-1"), standby(K8S, "pg-2", 1)], None) == \
        SplitBrain(("pg-0", "pg-1"))
    # A fresh install still starting: no primary was ever seen, so none is lost.
    assert look(lost, None, last_primary=None) == Waiting(None)
    assert look(lost, None) == Waiting(100.0, newly_lost=True)
    assert look(lost, 80.0) == Waiting(80.0)  # lost 20 s ago: not yet (after 30 s)
    due = look(lost, 70.0)
    assert isinstance(due, FailoverPlan) and due.promote.name == "pg-2" and due.old_primary == K8S.node("pg-0")
    assert due.rejoin == ()  # no data directory at hand: the orchestrator restarts the fenced pod
    refused = look([down(K8S, n.name) for n in K8S.nodes], 0.0)
    assert isinstance(refused, NoFailover) and "only 0 standby" in refused.reason


# converge: what a watcher repairs while one primary answers (a failover it did not finish).

def configured(spec: ClusterSpec, name: str) -> NodeStatus:
    return replace(primary(spec, name), sync_names=spec.sync_names(name))


def test_a_healthy_cluster_needs_no_repair() -> None:
    observed = [configured(LOCAL, "n1"), replace(standby(LOCAL, "n0", 0x100), source="127.0.0.1:5434"),
                replace(standby(LOCAL, "n2", 0x100), source="127.0.0.1:5434")]
    assert not converge(LOCAL, observed, "n1")


def test_promoted_but_not_configured_is_configured_and_the_standbys_follow() -> None:
    """The watcher was killed right after pg_promote: the new primary still has the standby's empty
    synchronous_standby_names (it would acknowledge writes no standby holds), n2 still points at
    the old primary n0, and n0 (fenced) is down."""
    observed = [down(LOCAL, "n0"), primary(LOCAL, "n1"), replace(standby(LOCAL, "n2", 0x100), source="127.0.0.1:5433")]
    fix = converge(LOCAL, observed, "n1", unfinished=("n0",))
    assert fix.configure and names(fix.repoint) == ["n2"] and names(fix.rejoin) == ["n0"]


def test_a_server_down_that_no_failover_fenced_is_not_the_watchers_to_start() -> None:
    observed = [configured(LOCAL, "n0"), down(LOCAL, "n1"), replace(standby(LOCAL, "n2", 0x100), source="127.0.0.1:5433")]
    assert not converge(LOCAL, observed, "n0")
    assert names(converge(LOCAL, observed, "n0", unfinished=("n1",)).rejoin) == ["n1"]


def test_a_standby_with_no_conninfo_or_an_unknown_one_is_left_alone() -> None:
    observed = [configured(LOCAL, "n0"), replace(standby(LOCAL, "n1", 0x100), source=""),
                replace(standby(LOCAL, "n2", 0x100), source="10.9.9.9:5432")]
    assert not converge(LOCAL, observed, "n0")
