"""The chart on three zones plus a node dedicated to the private pool "bank" (labelled and tainted
as docs/operator.md says), with zones required for Postgres and two operator replicas.

Postgres spreads over the zones; the private pool's pods run only on its dedicated node; a private
pool with no dedicated node is refused with its condition and Event; only the operator that holds
the Lease acts, and the other takes over when it stops.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.e2e.cluster import Cluster
from tests.e2e.conftest import CHART, NS, RELEASE, Kubectl, set_layout, wait
from tests.e2e.kubelet import Kubelet
from tests.e2e.test_kind import condition, grpcurl, pods, pool_pods, ready

VALUES = {
    "postgres": {"requireZones": True},
    "operator": {"replicas": 2},
    "pools": [{"name": "public", "visibility": "public", "replicas": 2, "organizations": []},
              {"name": "bank", "visibility": "private", "replicas": 2, "organizations": ["bank"]}],
}


@pytest.fixture(scope="module")
def install(cluster: Cluster, kubelet: Kubelet, kubectl: Kubectl) -> dict[str, Any]:
    set_layout(cluster, "zones")
    values = cluster.root / "zones-values.json"
    values.write_text(json.dumps(VALUES))
    r = kubectl.helm("install", RELEASE, str(CHART), "-n", NS, "--create-namespace", "-f", str(values),
                     "--wait", "--timeout", "6m", check=False, timeout=420)
    assert r.returncode == 0, f"helm install failed:\n{r.stdout}\n{r.stderr}"
    # The private pool's org must exist before the CA accepts the pool: a platform admin creates it.
    ca_ip = next(p for p in pods(kubectl, "ca") if ready(p))["status"]["podIP"]
    grpcurl(kubectl, ca_ip, "keyward.v1.Admin/CreateOrganization", json.dumps(
        {"org_id": "bank", "display_name": "Bank", "policy": {"private_zen_only": True,
                                                              "fail_mode": "FAIL_MODE_CLOSED"}}))
    yield {"ca_ip": ca_ip}
    kubectl.helm("uninstall", RELEASE, "-n", NS, "--wait", "--timeout", "60s", check=False, timeout=90)
    kubectl("delete", "namespace", NS, "--wait=true", "--timeout=90s", check=False, timeout=120)


def test_postgres_spread_over_the_zones(install: dict[str, Any], kubectl: Kubectl) -> None:
    nodes = {n["metadata"]["name"]: n["metadata"]["labels"].get("topology.kubernetes.io/zone")
             for n in kubectl.json("nodes")["items"]}
    zones = sorted(nodes[p["spec"]["nodeName"]] for p in pods(kubectl, "postgres"))
    assert zones == ["zone-a", "zone-b", "zone-c"], zones


def test_disruption_budgets_where_there_are_nodes_to_move_to(install: dict[str, Any], kubectl: Kubectl) -> None:
    # The CA and Postgres (3 zone nodes) and the public pool (3 shared nodes) get one; the private pool,
    # with one dedicated node, none (its drain could never finish).
    names = {p["metadata"]["name"] for p in kubectl.json("pdb", "-n", NS)["items"]}
    assert names == {f"{RELEASE}-ca", f"{RELEASE}-postgres", f"{RELEASE}-zen-public"}, names


def test_private_pool_only_on_its_dedicated_node(install: dict[str, Any], kubectl: Kubectl) -> None:
    z = wait(lambda: (p := kubectl.json("zenpool", "-n", NS, "bank"))
             and condition(p, "Registered").get("status") == "True" and p, 90, "pool bank registered private")
    assert z["status"]["registered"] == {"visibility": "private", "organizations": ["bank"]}
    bank = pool_pods(kubectl, "bank")
    assert len(bank) == 2 and {p["spec"]["nodeName"] for p in bank} == {"dedicated-bank"}
    assert "dedicated-bank" not in {p["spec"]["nodeName"] for p in pool_pods(kubectl, "public")}
    listed = grpcurl(kubectl, install["ca_ip"], "keyward.v1.Admin/ListZenPools")
    got = {p["name"]: p.get("visibility") for p in listed["pools"]}
    assert got == {"public": "POOL_VISIBILITY_PUBLIC", "bank": "POOL_VISIBILITY_PRIVATE"}, listed


def test_private_pool_without_a_dedicated_node_is_refused(install: dict[str, Any], kubectl: Kubectl) -> None:
    kubectl("apply", "-n", NS, "-f", "-", input=json.dumps({
        "apiVersion": "keyward.io/v1alpha1", "kind": "ZenPool", "metadata": {"name": "vault"},
        "spec": {"visibility": "private", "organizations": ["bank"], "replicas": 1}}))
    z = wait(lambda: (p := kubectl.json("zenpool", "-n", NS, "vault"))
             and condition(p, "Placement").get("reason") == "Refused" and p, 60, "pool vault refused")
    assert "no node is dedicated to pool vault" in condition(z, "Placement")["message"]
    ev = [e for e in kubectl.events(NS, "PlacementRefused") if e["involvedObject"]["name"] == "vault"]
    assert ev and ev[0]["type"] == "Warning"
    assert kubectl("get", "deployment", "-n", NS, f"{RELEASE}-zen-vault", check=False).returncode != 0
    kubectl("delete", "zenpool", "-n", NS, "vault", "--timeout=60s")


def test_only_the_lease_holder_acts_and_the_other_takes_over(install: dict[str, Any], kubectl: Kubectl,
                                                            kubelet: Kubelet) -> None:
    ops = sorted(p["metadata"]["name"] for p in pods(kubectl, "operator"))
    assert len(ops) == 2
    lease = kubectl.json("lease", "-n", NS, f"{RELEASE}-operator")
    leader = lease["spec"]["holderIdentity"]
    assert leader in ops
    follower = next(o for o in ops if o != leader)
    logs = {r.name: r.log for r in kubelet.pods.values() if r.name in ops}
    assert "holds the lease" in logs[leader].read_text()
    assert "holds the lease" not in logs[follower].read_text()
    # The leader dies without a word (SIGKILL, down for a while as with a lost node): the follower
    # takes over once the Lease expires, and acts.
    kubelet.kill_pod_process(leader, down_for=90)
    wait(lambda: kubectl.json("lease", "-n", NS, f"{RELEASE}-operator")["spec"]["holderIdentity"] == follower,
         60, "the follower to take the Lease")
    kubectl("scale", "-n", NS, "zenpool/public", "--replicas=1")
    wait(lambda: kubectl.json("deployment", "-n", NS, f"{RELEASE}-zen-public")["spec"]["replicas"] == 1, 60,
         "the new leader to apply the scale")
    assert "holds the lease" in logs[follower].read_text()
    # The new leader stops cleanly (its pod deleted, as a rollout or a drain does): it hands the Lease back.
    kubectl("delete", "pod", "-n", NS, follower, "--wait=false")
    wait(lambda: kubectl.json("lease", "-n", NS, f"{RELEASE}-operator")["spec"]["holderIdentity"] not in
         (follower, ""), 60, "another replica to take the released Lease")
    assert "released the lease" in logs[follower].read_text()
