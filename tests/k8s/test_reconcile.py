"""k8s.operator.reconcile: the operator's decisions as plain functions."""

from __future__ import annotations

from typing import Any

import kubernetes_validate

from k8s.operator.reconcile import (
    POOL_LABEL,
    Release,
    eligible_nodes,
    may_register,
    misplaced_pods,
    pdb_wanted,
    placement_problems,
    pool_deployment,
    pool_pdb,
    pool_service,
    prune_placement,
    set_condition,
    widens_placement,
)

REL = Release("keyward", "keyward", "keyward/zen:0.1.0")


def _node(name: str, pool: str | None = None, taint: bool = True) -> dict:
    labels = {POOL_LABEL: pool} if pool else {}
    taints = [{"key": POOL_LABEL, "value": pool, "effect": "NoSchedule"}] if pool and taint else []
    return {"metadata": {"name": name, "labels": labels}, "spec": {"taints": taints}}


def test_objects_validate_and_private_pools_are_pinned() -> None:
    priv = pool_deployment(REL, "eu-bank", {"visibility": "private", "organizations": ["bank"], "replicas": 3})
    pub = pool_deployment(REL, "public", {"visibility": "public"})
    for obj in (priv, pub, pool_service(REL, "public", False), pool_service(REL, "public", True),
                pool_pdb(REL, "public")):
        kubernetes_validate.validate(obj, "1.35.0", strict=True)
    pspec = priv["spec"]["template"]["spec"]
    assert priv["spec"]["replicas"] == 3
    assert pspec["nodeSelector"] == {POOL_LABEL: "eu-bank"}
    assert pspec["tolerations"][0]["value"] == "eu-bank"
    # PodSecurity `restricted` admits no added capability but NET_BIND_SERVICE: IPC_LOCK is gone.
    assert pspec["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    terms = pub["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": POOL_LABEL, "operator": "DoesNotExist"}]}]
    assert pool_service(REL, "public", True)["spec"]["selector"]["app.kubernetes.io/component"] == "bypass"


def test_a_pool_of_any_size_can_be_drained() -> None:
    # maxUnavailable 0 (the old 1-replica PDB) blocks every eviction: `kubectl drain` never finishes.
    assert pool_pdb(REL, "p")["spec"]["maxUnavailable"] == 1


def _n(name: str, dedicated: str | None = None, **labels: str) -> dict[str, Any]:
    lab = {**labels, **({POOL_LABEL: dedicated} if dedicated else {})}
    taints = [{"key": POOL_LABEL, "value": dedicated, "effect": "NoSchedule"}] if dedicated else []
    return {"metadata": {"name": name, "labels": lab}, "spec": {"taints": taints}}


def test_a_budget_only_where_it_can_protect_something() -> None:
    public, bank = {"visibility": "public"}, {"visibility": "private", "organizations": ["bank"]}
    # One node (kind, minikube): draining it stops the pool anyway; a budget would only block the drain.
    assert not pdb_wanted("public", public, [_n("kind-control-plane")])
    assert pdb_wanted("public", public, [_n("a"), _n("b")])
    # Dedicated nodes count for their private pool only, and never for public pools.
    nodes = [_n("a"), _n("bank-1", "bank"), _n("bank-2", "bank")]
    assert pdb_wanted("bank", bank, nodes) and not pdb_wanted("public", public, nodes)
    assert eligible_nodes("bank", bank, nodes) == ["bank-1", "bank-2"]
    assert not pdb_wanted("bank", bank, [_n("a"), _n("b"), _n("bank-1", "bank")])
    # kind with a control-plane and one worker: the control-plane's taint keeps ZENs off it.
    cp = _n("cp")
    cp["spec"]["taints"] = [{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]
    assert not pdb_wanted("public", public, [cp, _n("worker")])
    # A nodeSelector narrows the nodes.
    sel = {"visibility": "public", "nodeSelector": {"tier": "edge"}}
    assert not pdb_wanted("public", sel, [_n("a", tier="edge"), _n("b", tier="core")])


def test_bypass_selects_only_this_releases_relay() -> None:
    a = pool_service(Release("a-keyward", "ns", "z", instance="a"), "p", True)["spec"]["selector"]
    b = pool_service(Release("b-keyward", "ns", "z", instance="b"), "p", True)["spec"]["selector"]
    assert a == {"app.kubernetes.io/name": "keyward", "app.kubernetes.io/instance": "a",
                 "app.kubernetes.io/component": "bypass"}
    assert a != b


def test_placement_rules() -> None:
    spec = {"visibility": "private", "organizations": ["bank"]}
    assert placement_problems("eu-bank", spec, [_node("n1", "eu-bank")]) == []
    assert "no node is dedicated" in placement_problems("eu-bank", spec, [_node("n1")])[0]
    probs = placement_problems("eu-bank", spec, [_node("n1", "eu-bank"), _node("n2", "eu-bank", taint=False)])
    assert any("not the NoSchedule taint" in p for p in probs)
    probs = placement_problems("eu-bank", {**spec, "nodeSelector": {POOL_LABEL: "other"}}, [_node("n1", "eu-bank")])
    assert any("another pool's nodes" in p for p in probs)
    assert placement_problems("public", {"visibility": "public"}, []) == []


def test_misplaced_private_pods_are_found() -> None:
    nodes = [_node("dedicated", "eu-bank"), _node("shared")]
    pods = [{"metadata": {"name": "ok", "labels": {POOL_LABEL: "eu-bank"}}, "spec": {"nodeName": "dedicated"}},
            {"metadata": {"name": "bad", "labels": {POOL_LABEL: "eu-bank"}}, "spec": {"nodeName": "shared"}},
            {"metadata": {"name": "pending", "labels": {POOL_LABEL: "eu-bank"}}, "spec": {}}]
    assert misplaced_pods("eu-bank", {"visibility": "private"}, pods, nodes) == ["bad"]


def test_placement_pruned_when_visibility_changes() -> None:
    pub = pool_deployment(REL, "p", {"visibility": "public", "nodeSelector": {"disk": "ssd"}})["spec"]["template"]["spec"]
    priv = pool_deployment(REL, "p", {"visibility": "private", "organizations": ["o"]})["spec"]["template"]["spec"]
    prune_placement(pub, priv)
    assert priv["affinity"] is None and priv["nodeSelector"] == {POOL_LABEL: "p", "disk": None}
    back = pool_deployment(REL, "p", {"visibility": "public"})["spec"]["template"]["spec"]
    prune_placement(priv, back)
    assert back["nodeSelector"] is None and back["tolerations"] is None and back["affinity"]


def test_registration_waits_for_pods_on_shared_nodes_and_conditions() -> None:
    nodes = [_node("dedicated", "p"), _node("shared")]
    pods = [{"metadata": {"name": "a", "labels": {POOL_LABEL: "p"}}, "spec": {"nodeName": "shared"}}]
    assert "a" in may_register("p", {"visibility": "private"}, pods, nodes)
    assert may_register("p", {"visibility": "private"}, [], nodes) == ""
    pending = [{"metadata": {"name": "b", "labels": {POOL_LABEL: "p"}}, "spec": {}}]
    assert "b to be scheduled" in may_register("p", {"visibility": "private"}, pending, nodes)
    dep = {"metadata": {"generation": 3}, "spec": {"replicas": 2},
           "status": {"observedGeneration": 2, "updatedReplicas": 2, "replicas": 2}}
    assert "rollout" in may_register("p", {"visibility": "private"}, [], nodes, dep)
    dep["status"] = {"observedGeneration": 3, "updatedReplicas": 2, "replicas": 3}  # an old pod still there
    assert "rollout" in may_register("p", {"visibility": "private"}, [], nodes, dep)
    dep["status"]["replicas"] = 2
    assert may_register("p", {"visibility": "private"}, [], nodes, dep) == ""
    assert may_register("p", {"visibility": "public"}, pods, nodes) == ""
    c1 = set_condition([], "Ready", True, "R", "m", "t1")
    c2 = set_condition(c1, "Ready", True, "R", "m2", "t2")
    c3 = set_condition(c2, "Ready", False, "N", "m3", "t3")
    assert c2[0]["lastTransitionTime"] == "t1" and c3[0]["lastTransitionTime"] == "t3"


def test_only_private_to_public_must_wait_for_the_ca() -> None:
    priv = {"visibility": "private", "organizations": ["o"]}
    assert widens_placement({"visibility": "private", "organizations": ["o"]}, {"visibility": "public"})
    assert not widens_placement({"visibility": "public", "organizations": []}, priv)
    assert not widens_placement({"visibility": "private", "organizations": ["o", "p"]}, priv)
    assert not widens_placement(None, {"visibility": "public"})
