"""k8s.operator.plan: one pass over a ZenPool as plain data (no API, no CA)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from k8s.operator.plan import (
    PUBLIC,
    Answer,
    AskCA,
    Bypass,
    Eviction,
    PoolPlan,
    PoolState,
    PoolView,
    Register,
    SpecPlan,
    SpecView,
    bypass,
    ca_ready,
    plan_pool,
    plan_spec,
)
from k8s.operator.reconcile import POOL_LABEL, Release

REL = Release("keyward", "keyward", "keyward/zen:0.1.0")
NOW = "2030-01-01T00:00:00Z"
PUB = {"visibility": "public", "replicas": 2}
BANK = {"visibility": "private", "organizations": ["bank"], "replicas": 2}
PRIVATE = {"visibility": "private", "organizations": ["bank"]}
DOWN = "CA at keyward-ca:50051: UNAVAILABLE: connection refused"


def node(name: str, dedicated: str | None = None, taint: bool = True) -> dict[str, Any]:
    labels = {POOL_LABEL: dedicated} if dedicated else {}
    taints = [{"key": POOL_LABEL, "value": dedicated, "effect": "NoSchedule"}] if dedicated and taint else []
    return {"metadata": {"name": name, "labels": labels}, "spec": {"taints": taints}}


def pod(name: str, on: str | None, pool: str = "p") -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {POOL_LABEL: pool}}, "spec": {"nodeName": on} if on else {}}


def deployment(replicas: int = 2, ready: int = 2, generation: int = 1) -> dict[str, Any]:
    return {"metadata": {"generation": generation}, "spec": {"replicas": replicas},
            "status": {"observedGeneration": generation, "replicas": replicas, "updatedReplicas": replicas,
                       "readyReplicas": ready}}


def ran(spec: dict[str, Any], **status: Any) -> dict[str, Any]:
    """A status after ``spec`` was applied with identity "d"."""
    return {"applied": json.dumps(spec, sort_keys=True), "identity": "d", **status}


def cond(conds: list[dict[str, Any]], type_: str) -> tuple[str, str]:
    c = next(c for c in conds if c["type"] == type_)
    return c["status"], c["reason"]


SHARED = [node("shared-1"), node("shared-2")]
BANK_NODES = [*SHARED, node("bank-1", "p")]


def spec_plan(spec: dict[str, Any], status: dict[str, Any] | None = None, nodes: list[dict[str, Any]] = BANK_NODES,
              identity: str | None = "d", force: bool = False, widened: Answer | None = None) -> SpecPlan | Register:
    return plan_spec(SpecView(REL, "p", spec, status or {}, nodes, identity, NOW, force, widened=widened))


def applied(p: SpecPlan | Register) -> SpecPlan:
    assert isinstance(p, SpecPlan), p
    return p


# Private-ZEN-only placement.

@pytest.mark.parametrize("nodes, problem", [
    (SHARED, "no node is dedicated to pool p"),
    ([*SHARED, node("bank-1", "p", taint=False)], "carry the keyward.io/zen-pool=p label but not the NoSchedule taint"),
    ([*SHARED, node("other-1", "q")], "no node is dedicated to pool p"),
])
def test_a_private_pool_without_dedicated_nodes_is_refused(nodes: list[dict[str, Any]], problem: str) -> None:
    p = applied(spec_plan(BANK, nodes=nodes))
    assert p.deployment is None and p.runs is None  # nothing applied, nothing more to do
    assert cond(p.conditions, "Placement") == ("False", "Refused") and problem in p.status["refused"]
    assert [e.reason for e in p.events] == ["PlacementRefused"] and problem in p.events[0].message
    # Reported once: the next pass finds the same reason in the status and posts nothing.
    assert applied(spec_plan(BANK, {"refused": p.status["refused"]}, nodes=nodes)).events == []


def test_a_refused_change_leaves_the_pool_running_as_applied() -> None:
    p = applied(spec_plan(BANK, ran(PUB), nodes=SHARED))
    assert p.deployment is None and p.runs == PUB


def test_private_pods_go_only_to_their_dedicated_nodes_public_ones_never_there() -> None:
    p = applied(spec_plan(BANK, nodes=BANK_NODES))
    assert p.deployment is not None and cond(p.conditions, "Placement") == ("True", "DedicatedNodes")
    tpl = p.deployment["spec"]["template"]["spec"]
    assert tpl["nodeSelector"] == {POOL_LABEL: "p"} and "affinity" not in tpl
    assert tpl["tolerations"] == [{"key": POOL_LABEL, "operator": "Equal", "value": "p", "effect": "NoSchedule"}]
    p = applied(spec_plan(PUB, nodes=BANK_NODES))
    assert p.deployment is not None and cond(p.conditions, "Placement") == ("True", "Public")
    tpl = p.deployment["spec"]["template"]["spec"]
    assert "nodeSelector" not in tpl and "tolerations" not in tpl
    assert tpl["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"] == \
        [{"matchExpressions": [{"key": POOL_LABEL, "operator": "DoesNotExist"}]}]
    # Placement fixed: the refusal is cleared.
    assert applied(spec_plan(BANK, {"refused": "spec not applied: ..."})).status == {"refused": None}


# What is applied, and when.

@pytest.mark.parametrize("spec, status, identity, force, apply, identity_out, events", [
    # Nothing changed: nothing applied, nothing posted.
    (PUB, ran(PUB), "d", False, False, None, []),
    # Forced (created, changed, operator started): applied again, but "Applied" only for a change.
    (PUB, ran(PUB), "d", True, True, "d", []),
    # The identity is due (or gone): a new one is issued first, then applied (it rolls the ZENs).
    (PUB, ran(PUB), None, False, True, None, []),
    # Renewed elsewhere (its digest differs from what the pods were given): applied.
    (PUB, ran(PUB, identity="old"), "d", False, True, "d", []),
    # Scaled (`kubectl scale` through the scale subresource): applied, and said.
    ({**PUB, "replicas": 3}, ran(PUB), "d", False, True, "d", ["Applied"]),
    # Created: applied; no "Applied" (nothing ran before).
    (PUB, {}, None, True, True, None, []),
])
def test_what_is_applied(spec: dict[str, Any], status: dict[str, Any], identity: str | None, force: bool,
                         apply: bool, identity_out: str | None, events: list[str]) -> None:
    p = applied(spec_plan(spec, status, identity=identity, force=force))
    assert (p.deployment is not None) == apply and p.runs == (spec if apply else json.loads(status["applied"]))
    assert [e.reason for e in p.events + p.applied_events] == events
    if apply:
        assert p.deployment is not None and p.deployment["spec"]["replicas"] == spec["replicas"]
        assert p.identity == identity_out and p.applied_status == {"applied": json.dumps(spec, sort_keys=True)}


def test_scaling_says_so() -> None:
    p = applied(spec_plan({**PUB, "replicas": 5}, ran(PUB)))
    assert p.applied_events[0].message == "pool updated: visibility=public replicas=5"


def test_a_private_pool_made_public_is_registered_public_before_its_pods_move() -> None:
    status = ran(BANK, registered={"visibility": "private", "organizations": ["bank"]})
    assert spec_plan(PUB, status) == Register("public", ())
    # The CA cannot be reached: held on the dedicated nodes.
    p = applied(spec_plan(PUB, status, widened=Answer(unavailable=DOWN)))
    assert p.deployment is None and p.runs == BANK
    assert cond(p.conditions, "Placement") == ("False", "WaitingForCA")
    assert DOWN in next(c["message"] for c in p.conditions if c["type"] == "Placement")
    # Registered public: now the pods may leave.
    p = applied(spec_plan(PUB, status, widened=Answer(PoolState("p", "public", (), False))))
    assert p.deployment is not None and "nodeSelector" not in p.deployment["spec"]["template"]["spec"]
    assert p.status["registered"] == PUBLIC and [e.reason for e in p.events] == ["Registered"]
    assert [e.reason for e in p.applied_events] == ["Applied"]
    # Narrowing needs no such order (the pods move first; registration waits for them).
    assert isinstance(spec_plan(BANK, ran(PUB, registered=dict(PUBLIC))), SpecPlan)


# Bypass: the rule.

@pytest.mark.parametrize("ca, zen, fail_closed, on, reason", [
    (False, False, False, True, "BothPlanesDown"),
    (False, False, True, False, "FailClosed"),
    (False, False, None, False, "FailClosed"),  # not yet known: fail-closed
    (True, False, False, False, "PlanesReady"),
    (False, True, False, False, "PlanesReady"),
    (True, True, None, False, "PlanesReady"),
])
def test_bypass_rule(ca: bool, zen: bool, fail_closed: bool | None, on: bool, reason: str) -> None:
    b = bypass(ca_ready=ca, pool_ready=zen, serves_fail_closed_org=fail_closed)
    assert (b.on, b.reason) == (on, reason)


def test_ca_readiness_from_endpoint_slices() -> None:
    def sl(*ready: bool | None) -> dict[str, Any]:
        return {"endpoints": [{"conditions": {} if r is None else {"ready": r}} for r in ready]}
    assert not ca_ready([]) and not ca_ready([sl(False)]) and not ca_ready([sl()])
    assert ca_ready([sl(False), sl(True)]) and ca_ready([sl(None)])  # unknown counts as ready


# The running pool.

def pool_plan(runs: dict[str, Any], status: dict[str, Any], *, ready: int = 2, ca: bool = True,
              known: Answer | None = None, registration: Answer | None = None,
              pods: list[dict[str, Any]] | None = None, nodes: list[dict[str, Any]] = BANK_NODES,
              dep: dict[str, Any] | None = None) -> PoolPlan | AskCA | Register:
    return plan_pool(PoolView("p", runs, status, nodes, dep or deployment(ready=ready), pods or [], ca, NOW,
                              generation=1, known=known, registration=registration))


def planned(p: PoolPlan | AskCA | Register) -> PoolPlan:
    assert isinstance(p, PoolPlan), p
    return p


def ca_says(vis: str = "public", orgs: tuple[str, ...] = (), fail_closed: bool = False) -> Answer:
    return Answer(PoolState("p", vis, orgs, fail_closed))


PUB_REG = {"visibility": "public", "organizations": []}


@pytest.mark.parametrize("case, ca, ready, status, known, on, reason, switch", [
    ("both planes down", False, 0, {"registered": PUB_REG}, ca_says(), True, "BothPlanesDown", ["BypassOn"]),
    ("already bypassed", False, 0, {"registered": PUB_REG, "bypass": True}, ca_says(), True, "BothPlanesDown", []),
    ("a fail-closed org behind it", False, 0, {"registered": PUB_REG}, ca_says(fail_closed=True), False,
     "FailClosed", []),
    # The CA is down too: what it said of the pool as registered now still counts...
    ("CA gone, answer known", False, 0, {"registered": PUB_REG, "servesFailClosedOrg": False},
     Answer(unavailable=DOWN), True, "BothPlanesDown", ["BypassOn"]),
    # ...but an answer about another registration, or none, is unknown: fail-closed.
    ("CA gone, answer for another registration", False, 0,
     {"registered": {"visibility": "private", "organizations": ["bank"]}, "servesFailClosedOrg": False},
     Answer(unavailable=DOWN), False, "FailClosed", []),
    ("CA gone, never answered", False, 0, {"registered": PUB_REG}, Answer(unavailable=DOWN), False, "FailClosed", []),
    ("only the CA down", False, 2, {"registered": PUB_REG}, Answer(unavailable=DOWN), False, "PlanesReady", []),
    ("a ZEN back", False, 1, {"registered": PUB_REG, "bypass": True}, ca_says(), False, "PlanesReady", ["BypassOff"]),
    ("the CA back", True, 0, {"registered": PUB_REG, "bypass": True}, ca_says(), False, "PlanesReady", ["BypassOff"]),
])
def test_bypass_of_a_pool(case: str, ca: bool, ready: int, status: dict[str, Any], known: Answer, on: bool,
                          reason: str, switch: list[str]) -> None:
    p = planned(pool_plan(PUB, status, ca=ca, ready=ready, known=known))
    assert p.bypass.on == on and p.bypass.reason == reason, case
    assert [e.reason for e in p.switch] == switch, case
    assert p.status["bypass"] is bool(status.get("bypass")), case  # the new value only once the Service switched
    assert cond(p.conditions, "Bypass") == ("True" if on else "False", reason), case


def test_bypass_events_say_which_plane_is_back() -> None:
    zen = planned(pool_plan(PUB, {"registered": PUB_REG, "bypass": True}, ca=False, ready=1, known=ca_says()))
    assert "a ZEN of the pool is ready again" in zen.switch[0].message
    ca = planned(pool_plan(PUB, {"registered": PUB_REG, "bypass": True}, ca=True, ready=0, known=ca_says()))
    assert "the CA is ready again" in ca.switch[0].message
    on = planned(pool_plan(PUB, {"registered": PUB_REG}, ca=False, ready=0, known=ca_says()))
    assert "nothing decrypted" in on.switch[0].message and "keyward-zen" not in on.switch[0].message


BANK_REG = {"visibility": "private", "organizations": ["bank"]}
FC = ca_says("private", ("bank",), True)


@pytest.mark.parametrize("status, known, reg", [
    ({"registered": BANK_REG}, FC, None),
    ({"registered": BANK_REG, "bypass": True}, FC, None),  # bypassed before it was known: switched back
    ({"registered": PUB_REG}, ca_says(), FC),  # the answer to this pass's registration counts at once
    ({"registered": BANK_REG, "servesFailClosedOrg": True}, Answer(unavailable=DOWN), None),
])
def test_never_bypassed_while_it_serves_a_fail_closed_org(status: dict[str, Any], known: Answer,
                                                          reg: Answer | None) -> None:
    """Both planes down, and whatever else holds."""
    p = planned(pool_plan(BANK, status, ca=False, ready=0, known=known, registration=reg, pods=[pod("a", "bank-1")]))
    assert not p.bypass.on and p.bypass.reason == "FailClosed"
    assert [e.reason for e in p.switch] == (["BypassOff"] if status.get("bypass") else [])
    assert all(e.message.startswith("the pool serves a fail-closed org: ") for e in p.switch)


# Registration order, evictions.

def test_private_pods_on_shared_nodes_are_evicted_before_the_ca_is_told() -> None:
    pods = [pod("a", "shared-1"), pod("b", "bank-1"), pod("c", None)]
    p = planned(pool_plan(BANK, {"registered": PUB_REG}, pods=pods))  # the CA is not even asked
    assert p.evict == [Eviction("a", "shared-1")]
    ev = p.evict[0].event("p", "deleted (eviction refused)")
    assert ev.reason == "PodEvicted" and ev.message == ("pod a of private pool p ran on node shared-1, which is not "
                                                        "dedicated to the pool: deleted (eviction refused)")
    assert cond(p.conditions, "Registered") == ("False", "WaitingForPlacement")
    # Pending pods, or a rollout not yet seen complete, wait too.
    p = planned(pool_plan(BANK, {"registered": PUB_REG}, pods=[pod("b", "bank-1"), pod("c", None)]))
    assert p.evict == [] and cond(p.conditions, "Registered") == ("False", "WaitingForPlacement")
    p = planned(pool_plan(BANK, {"registered": PUB_REG}, pods=[pod("b", "bank-1")],
                          dep={**deployment(), "metadata": {"generation": 2}}))
    assert cond(p.conditions, "Registered") == ("False", "WaitingForPlacement")
    # Placed: the CA is asked, then told.
    assert pool_plan(BANK, {"registered": PUB_REG}, pods=[pod("b", "bank-1")]) == AskCA()
    assert pool_plan(BANK, {"registered": PUB_REG}, pods=[pod("b", "bank-1")], known=ca_says()) == \
        Register("private", ("bank",))


@pytest.mark.parametrize("status, known, reg, want", [
    # Registered as it runs, and the CA agrees: nothing to do.
    ({"registered": PUB_REG}, ca_says(), None, ("True", "Registered", [], None)),
    # The CA does not know it (restored, or registered by hand elsewhere): registered.
    ({"registered": PUB_REG}, Answer(None), ca_says(), ("True", "Registered", ["Registered"], PUB_REG)),
    ({}, ca_says(), ca_says(), ("True", "Registered", ["Registered"], PUB_REG)),
    # The CA cannot be reached: the condition keeps what was registered.
    ({"registered": PUB_REG}, Answer(unavailable=DOWN), None, ("True", "CAUnavailable", [], None)),
    ({}, Answer(unavailable=DOWN), None, ("False", "CAUnavailable", [], None)),
    ({}, ca_says("private", ("x",)), Answer(unavailable=DOWN), ("False", "CAUnavailable", [], None)),
    # The CA refuses: reported once per reason.
    ({}, Answer(None), Answer(refused="CA RegisterZenPool: INVALID_ARGUMENT: no org"),
     ("False", "CARefused", ["RegistrationRefused"], None)),
    ({"conditions": [{"type": "Registered", "status": "False", "reason": "CARefused",
                      "message": "CA RegisterZenPool: INVALID_ARGUMENT: no org", "lastTransitionTime": NOW}]},
     Answer(None), Answer(refused="CA RegisterZenPool: INVALID_ARGUMENT: no org"), ("False", "CARefused", [], None)),
])
def test_registration(status: dict[str, Any], known: Answer, reg: Answer | None,
                      want: tuple[str, str, list[str], dict[str, Any] | None]) -> None:
    if reg is not None:
        assert pool_plan(PUB, status, known=known) == Register("public", ())
    p = planned(pool_plan(PUB, status, known=known, registration=reg))
    ok, reason, events, registered = want
    assert cond(p.conditions, "Registered") == (ok, reason)
    assert [e.reason for e in p.events] == events
    assert p.status.get("registered") == registered
    assert ("servesFailClosedOrg" in p.status) == (ok == "True" and reason == "Registered")


def test_status_reports_what_runs_and_the_budget() -> None:
    p = planned(pool_plan({**PUB, "replicas": 3}, {"registered": PUB_REG}, known=ca_says(),
                          dep=deployment(replicas=2, ready=1)))
    # Observed, not desired: what the Deployment controller reports (spec.replicas is the desired count).
    assert (p.status["replicas"], p.status["readyReplicas"], p.ready) == (2, 1, 1)
    assert p.status["observedGeneration"] == 1
    assert cond(p.conditions, "Ready") == ("True", "ZensReady")
    assert next(c["message"] for c in p.conditions if c["type"] == "Ready") == "1 of 3 ZEN(s) ready"
    assert p.pdb  # two shared nodes to run on
    assert not planned(pool_plan(PUB, {"registered": PUB_REG}, known=ca_says(), nodes=[node("only")])).pdb
    assert not planned(pool_plan(BANK, {"registered": PUB_REG}, pods=[pod("a", "shared-1")])).pdb  # one bank node
    none = planned(pool_plan(PUB, {"registered": PUB_REG}, known=ca_says(), dep={"status": {}}))
    assert cond(none.conditions, "Ready") == ("False", "NoReadyZen") and none.status["replicas"] == 0


def test_conditions_keep_their_transition_time() -> None:
    before = planned(pool_plan(PUB, {"registered": PUB_REG}, known=ca_says())).conditions
    old = [{**c, "lastTransitionTime": "2029-01-01T00:00:00Z"} for c in before]
    after = planned(pool_plan(PUB, {"registered": PUB_REG, "conditions": old}, known=ca_says())).conditions
    assert {c["lastTransitionTime"] for c in after} == {"2029-01-01T00:00:00Z"}
    assert Bypass(False, "PlanesReady", "traffic goes through the pool's ZENs") == \
        planned(pool_plan(PUB, {"registered": PUB_REG}, known=ca_says())).bypass
