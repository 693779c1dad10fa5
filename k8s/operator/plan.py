"""One pass over a ZenPool, decided as plain data.

The handlers observe (nodes, the pool's identity, its Deployment and pods, the
CA's readiness and its answers about the pool), call a planner and carry out
the plan; nothing here calls the API or the CA. A planner that needs an answer
from the CA returns the question instead (:class:`AskCA`, :class:`Register`):
the handler asks it and plans again with the answer in the view
(``view.answered(question, answer)``).

Two planners, because the second must see the Deployment as it is after the
first is applied (a pool made private is registered private only once its
rollout onto the dedicated nodes is seen complete):

* :func:`plan_spec`: placement (refused, with the reason), what to apply and
  when (a private pool made public is registered public first).
* :func:`plan_pool`: evictions, the budget, the registration with the CA,
  bypass, and the status (conditions, Events).

The bypass rule is :func:`bypass`, its only definition.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from k8s.operator import reconcile as rc

Obj = dict[str, Any]
PUBLIC: Mapping[str, Any] = {"visibility": "public", "organizations": []}


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class PoolState:
    """What the CA says of a pool (``ListZenPools``, ``RegisterZenPool``)."""

    name: str
    visibility: str
    org_ids: tuple[str, ...]
    serves_fail_closed_org: bool


@dataclass(frozen=True)
class Answer:
    """The CA's answer about the pool: the pool as the CA knows it (None: unknown to it), or why
    there is none."""

    pool: PoolState | None = None
    unavailable: str = ""  # the CA could not be reached or did not answer
    refused: str = ""  # the CA answered with an error a person must act on

    @property
    def error(self) -> str:
        return self.unavailable or self.refused


@dataclass(frozen=True)
class AskCA:
    """The plan needs the CA's view of the pool (``ListZenPools``, cached): ask, plan again."""


@dataclass(frozen=True)
class Register:
    """Register the pool with the CA, then plan again with the answer."""

    visibility: str
    organizations: tuple[str, ...]


Question = AskCA | Register


# Bypass: the rule, once.

@dataclass(frozen=True)
class Bypass:
    on: bool
    reason: str  # the Bypass condition's: BothPlanesDown | FailClosed | PlanesReady
    message: str


def bypass(*, ca_ready: bool, pool_ready: bool, serves_fail_closed_org: bool | None) -> Bypass:
    """A pool's Service points at the bypass relay only while the CA has no ready endpoint AND
    the pool has no ready ZEN, and never for a pool serving a fail-closed org. Not knowing
    whether it serves one (``None``) counts as serving one."""
    if ca_ready or pool_ready:
        return Bypass(False, "PlanesReady", "traffic goes through the pool's ZENs")
    if serves_fail_closed_org is None or serves_fail_closed_org:
        return Bypass(False, "FailClosed", "both planes are down, but the pool serves a fail-closed org (or the "
                                           "operator has not yet learnt that it does not): traffic is refused, "
                                           "never bypassed")
    return Bypass(True, "BothPlanesDown", "traffic goes through the bypass relay")


def ca_ready(slices: list[Obj]) -> bool:
    """Any ready endpoint in the CA Service's EndpointSlices (unknown readiness counts as ready)."""
    return any((ep.get("conditions") or {}).get("ready") is not False
               for s in slices for ep in s.get("endpoints") or [])


# The spec: placement and what to apply.

@dataclass(frozen=True)
class SpecView:
    rel: rc.Release
    name: str
    spec: Obj
    status: Obj
    nodes: list[Obj]
    identity: str | None
    """The digest of the pool's identity certificate; None: there is none, or it is due for renewal."""
    now: str
    force: bool = False
    """Apply even if nothing changed (the pool was created, changed, or the operator started)."""
    resources: Obj | None = None
    """The ZEN containers' resources (the chart's); None: the defaults."""
    widened: Answer | None = None
    """The answer to the public registration the plan asked for (a private pool made public)."""

    def answered(self, q: Question, a: Answer) -> SpecView:
        return replace(self, widened=a)


@dataclass(frozen=True)
class SpecPlan:
    conditions: list[Obj]
    """So far: the second plan goes on from them."""
    status: Obj
    """Status fields to write now."""
    events: list[Event]
    runs: Obj | None
    """The spec the pool runs once this plan is carried out; None: never applied (nothing more to do)."""
    deployment: Obj | None = None
    """The Deployment to apply, with the Service and budget; None: nothing to apply."""
    identity: str | None = None
    """The identity digest for the pod template; None: issue the identity first (none yet, or due)."""
    applied_status: Obj = field(default_factory=dict)
    applied_events: list[Event] = field(default_factory=list)
    """Status fields and Events once the Deployment is applied."""


def plan_spec(v: SpecView) -> SpecPlan | Register:
    """Placement, and what to apply: refused while a private pool has no node dedicated to it
    (nothing applied; one Event per new reason); else applied when the spec or the identity
    changed, or when forced."""
    name, spec, status = v.name, v.spec, v.status
    conds: list[Obj] = list(status.get("conditions") or [])
    # Stored as JSON text: a merge patch would keep keys the spec has since dropped.
    runs: Obj | None = json.loads(status["applied"]) if status.get("applied") else None
    problems = rc.placement_problems(name, spec, v.nodes)
    if problems:
        msg = "spec not applied: " + "; ".join(problems)
        return SpecPlan(rc.set_condition(conds, "Placement", False, "Refused", msg, v.now), {"refused": msg},
                        [] if status.get("refused") == msg else [Event("Warning", "PlacementRefused", msg)], runs)
    out: Obj = {"refused": None} if status.get("refused") else {}
    private = spec.get("visibility") == "private"
    conds = rc.set_condition(conds, "Placement", True, "DedicatedNodes" if private else "Public",
                             f"pods run only on nodes labelled and tainted {rc.POOL_LABEL}={name}" if private
                             else f"pods avoid nodes dedicated to private pools ({rc.POOL_LABEL})", v.now)
    if not (v.force or runs != spec or v.identity is None or status.get("identity") != v.identity):
        return SpecPlan(conds, out, [], runs)
    events = []
    if rc.widens_placement(status.get("registered"), spec):
        if v.widened is None:
            return Register("public", ())
        if v.widened.error:  # held where it is: the CA may still send it private keys
            return SpecPlan(rc.set_condition(
                conds, "Placement", False, "WaitingForCA",
                "still registered private with the CA: its pods leave the dedicated nodes only after "
                f"the CA stops sending it private keys ({v.widened.error})", v.now), out, [], runs)
        out["registered"] = dict(PUBLIC)
        events.append(Event("Normal", "Registered",
                            "registered with the CA as public, before leaving the dedicated nodes"))
    changed = [Event("Normal", "Applied", f"pool updated: visibility={spec.get('visibility')} "
                                          f"replicas={spec.get('replicas', 2)}")] if runs not in (None, spec) else []
    return SpecPlan(conds, out, events, dict(spec), rc.pool_deployment(v.rel, name, spec, v.resources),
                    identity=v.identity, applied_status={"applied": json.dumps(spec, sort_keys=True)},
                    applied_events=changed)


# The running pool: evictions, budget, registration, bypass, status.

@dataclass(frozen=True)
class PoolView:
    name: str
    runs: Obj
    """The spec the pool runs (the last applied)."""
    status: Obj
    """As read, with what this pass has written so far (the first plan's conditions included)."""
    nodes: list[Obj]
    deployment: Obj | None
    """The pool's Deployment as read after anything applied this pass."""
    pods: list[Obj]
    ca_ready: bool
    now: str
    generation: int | None = None
    known: Answer | None = None
    """The CA's view of the pool, once the plan asked for it."""
    registration: Answer | None = None
    """The answer to the registration the plan asked for."""

    def answered(self, q: Question, a: Answer) -> PoolView:
        return replace(self, registration=a) if isinstance(q, Register) else replace(self, known=a)


@dataclass(frozen=True)
class Eviction:
    pod: str
    node: str

    def event(self, pool: str, how: str) -> Event:
        return Event("Warning", "PodEvicted", f"pod {self.pod} of private pool {pool} ran on node {self.node}, "
                                              f"which is not dedicated to the pool: {how}")


@dataclass(frozen=True)
class PoolPlan:
    status: Obj
    """Facts to write now; ``bypass`` as the Service is now."""
    events: list[Event]
    """About what this pass did with the CA."""
    pdb: bool
    """A PodDisruptionBudget wanted (at least two nodes to run on)."""
    evict: list[Eviction]
    bypass: Bypass
    switch: list[Event]
    """Non-empty: the Service must switch to ``bypass.on``; these are posted once it has."""
    conditions: list[Obj]
    """Written once the plan is carried out."""
    ready: int


def _registration(v: PoolView, conds: list[Obj]) -> tuple[list[Obj], Obj, list[Event], bool | None] | Question:
    """The registration with the CA: conditions, status, Events, and whether the pool serves a
    fail-closed org as far as the CA has said of the pool as it is now (None: unknown)."""
    vis, orgs = rc.registration(v.runs)
    want = {"visibility": vis, "organizations": orgs}
    registered = v.status.get("registered")
    fail_closed = v.status.get("servesFailClosedOrg") if registered == want else None
    # Evicted pods still count: they run until their grace period ends.
    wait = rc.may_register(v.name, v.runs, v.pods, v.nodes, v.deployment)
    if wait:
        return rc.set_condition(conds, "Registered", False, "WaitingForPlacement", wait, v.now), {}, [], fail_closed
    if v.known is None:
        return AskCA()
    k = v.known.pool
    if v.registration is None and not v.known.error and (
            registered != want or k is None or (k.visibility, list(k.org_ids)) != (vis, orgs)):
        return Register(vis, tuple(orgs))
    a = v.registration or v.known
    if a.unavailable:
        return rc.set_condition(conds, "Registered", registered == want, "CAUnavailable", a.unavailable,
                                v.now), {}, [], fail_closed
    if a.refused or a.pool is None:
        events = [] if any(c.get("reason") == "CARefused" and c.get("message") == a.refused for c in conds) \
            else [Event("Warning", "RegistrationRefused", a.refused)]
        return rc.set_condition(conds, "Registered", False, "CARefused", a.refused, v.now), {}, events, fail_closed
    out: Obj = {"servesFailClosedOrg": a.pool.serves_fail_closed_org}
    events = []
    if v.registration is not None:
        out["registered"] = want
        events.append(Event("Normal", "Registered", f"registered with the CA as {vis}"
                            + (f" for {', '.join(orgs)}" if orgs else "")))
    return rc.set_condition(conds, "Registered", True, "Registered", f"the CA authorizes this pool as {vis}",
                            v.now), out, events, a.pool.serves_fail_closed_org


def plan_pool(v: PoolView) -> PoolPlan | Question:
    """Evict a private pool's pods from shared nodes; register with the CA once placement
    allows; bypass when both planes are down (never for a fail-closed org); report."""
    reg = _registration(v, list(v.status.get("conditions") or []))
    if isinstance(reg, (AskCA, Register)):
        return reg
    conds, out, events, fail_closed = reg
    observed = (v.deployment or {}).get("status") or {}
    ready = int(observed.get("readyReplicas") or 0)
    node_of = {p["metadata"]["name"]: (p.get("spec") or {}).get("nodeName") for p in v.pods}
    b = bypass(ca_ready=v.ca_ready, pool_ready=ready > 0, serves_fail_closed_org=fail_closed)
    now_on = bool(v.status.get("bypass"))
    why_off = ("the pool serves a fail-closed org" if b.reason == "FailClosed" else
               f"{'the CA' if v.ca_ready else 'a ZEN of the pool'} is ready again")
    switch = [] if b.on == now_on else [
        Event("Warning", "BypassOn", f"the CA has no ready endpoint and pool {v.name} has no ready ZEN: its Service "
                                     "now points at the bypass relay (traffic forwarded, nothing decrypted)") if b.on
        else Event("Normal", "BypassOff", f"{why_off}: the Service points back at the pool's ZENs")]
    conds = rc.set_condition(conds, "Bypass", b.on, b.reason, b.message, v.now)
    conds = rc.set_condition(conds, "Ready", ready > 0, "ZensReady" if ready else "NoReadyZen",
                             f"{ready} of {v.runs.get('replicas', 2)} ZEN(s) ready", v.now)
    # Always written (`kubectl get zenpools` shows false, not a blank), and only what the Service
    # really does: the executor writes the new value once the switch is done. ``replicas`` is
    # observed, not desired (what `kubectl scale` and `kubectl get zenpools` report).
    out.update(bypass=now_on, replicas=int(observed.get("replicas") or 0), readyReplicas=ready,
               observedGeneration=v.generation)
    return PoolPlan(out, events, rc.pdb_wanted(v.name, v.runs, v.nodes),
                    [Eviction(p, str(node_of[p])) for p in rc.misplaced_pods(v.name, v.runs, v.pods, v.nodes)],
                    b, switch, conds, ready)
