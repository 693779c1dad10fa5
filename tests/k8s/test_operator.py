"""The kopf operator, run for real against the KMock API stand-in (kapi.py),
with a real CA over mTLS that trusts the PKI the operator issued.

KMock runs no controllers, so these tests play their part where needed and
say so: the scheduler (a pod's nodeName), the Deployment controller
(readyReplicas) and the EndpointSlice controller (the CA's readiness).
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest

from k8s.operator.handlers import FINALIZER
from k8s.operator.reconcile import POOL_LABEL
from protos.keyward.v1 import keyward_pb2 as pb
from tests.helpers import clients, code_of
from tests.k8s.conftest import OperatorCA
from tests.k8s.kapi import NS, KeywardApi, events, obj, requests, until

pytestmark = pytest.mark.kmock(cls=KeywardApi)

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = ROOT / ".tools" / "bin" / "kubectl"
ZP = "keyward.io/v1alpha1/zenpools"
ZP_URL = f"/apis/keyward.io/v1alpha1/namespaces/{NS}/zenpools"


def pool(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "keyward.io/v1alpha1", "kind": "ZenPool",
            "metadata": {"name": name, "namespace": NS}, "spec": {"replicas": 2, **spec}}


def node(api: KeywardApi, name: str, dedicated_to: str | None = None, taint: bool = True) -> None:
    labels = {POOL_LABEL: dedicated_to} if dedicated_to else {}
    taints = [{"key": POOL_LABEL, "value": dedicated_to, "effect": "NoSchedule"}] if dedicated_to and taint else []
    api.objects["v1/nodes", None, name] = {"apiVersion": "v1", "kind": "Node",
                                           "metadata": {"name": name, "labels": labels}, "spec": {"taints": taints}}


def pod(api: KeywardApi, name: str, pool_name: str, node_name: str) -> None:
    """The scheduler's part: a pool pod bound to a node."""
    api.objects["v1/pods", NS, name] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {
            "app.kubernetes.io/name": "keyward", "app.kubernetes.io/instance": "keyward",
            "app.kubernetes.io/component": "zen", POOL_LABEL: pool_name}},
        "spec": {"nodeName": node_name}}


def deployment_ready(api: KeywardApi, pool_name: str, ready: int) -> None:
    """The Deployment controller's part: the rollout is done and ``ready`` ZENs are ready."""
    d = api.objects["apps/v1/deployments", NS, f"keyward-zen-{pool_name}"]
    n = d["spec"]["replicas"]
    d.patch({"status": {"observedGeneration": d["metadata"]["generation"], "replicas": n, "updatedReplicas": n,
                        "readyReplicas": ready}})


def ca_endpoint(api: KeywardApi, ready: bool) -> None:
    """The EndpointSlice controller's part: is a CA pod ready behind the Service."""
    api.objects["discovery.k8s.io/v1/endpointslices", NS, "keyward-ca-abcde"] = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": "keyward-ca-abcde", "namespace": NS,
                     "labels": {"kubernetes.io/service-name": "keyward-ca"}},
        "endpoints": [{"addresses": ["10.0.0.7"], "conditions": {"ready": ready}}]}


def status(api: KeywardApi, name: str) -> dict[str, Any]:
    o = obj(api, ZP, name)
    return dict(o.get("status") or {}) if o is not None else {}


def cond(api: KeywardApi, name: str, type_: str) -> dict[str, Any]:
    return next((c for c in status(api, name).get("conditions") or [] if c["type"] == type_), {})


def selector(api: KeywardApi, pool_name: str) -> dict[str, str]:
    svc = obj(api, "v1/services", f"keyward-zen-{pool_name}")
    return dict(svc["spec"]["selector"]) if svc is not None else {}


def ca_pools(oc: OperatorCA) -> dict[str, pb.ZenPool]:
    c = clients(oc.addr, oc.pki, "platform-admin")
    return {p.name: p for p in c.admin.ListZenPools(pb.ListZenPoolsRequest(), timeout=30).pools}


async def operator_ticks(api: KeywardApi, n: int) -> None:
    """Wait until the operator has checked the CA's readiness ``n`` more times (bounded)."""
    def count() -> int:
        return sum(1 for r in requests(api) if "endpointslices" in str(r.url))
    start = count()
    await until(lambda: count() >= start + n, 20, f"{n} more operator checks")


def kubectl(api: KeywardApi, *args: str) -> str:
    p = subprocess.run([str(KUBECTL), f"--server={api.url}", "-n", NS, *args], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


async def test_pool_created_scaled_made_private_and_deleted(api: KeywardApi, operator_ca: Any) -> None:
    node(api, "shared-1")
    node(api, "shared-2")  # two nodes the public pool may run on: a disruption budget protects something
    node(api, "bank-1", dedicated_to="edge")
    oc: OperatorCA = await operator_ca(start=False)

    # The platform PKI is issued at install, by the operator.
    for s in ("keyward-pki-root", "keyward-ca-tls", "keyward-admin-tls"):
        assert obj(api, "v1/secrets", s) is not None, s
    # The CA reads its database password from the chart's Secret itself (KEYWARD_DB_PASSWORD_FILE).
    assert obj(api, "v1/secrets", "keyward-ca-pgpass") is None

    await api.post(ZP_URL, json=pool("edge", visibility="public"))
    await until(lambda: obj(api, "policy/v1/poddisruptionbudgets", "keyward-zen-edge"), 20,
                "the pool's Deployment, Service and PDB")
    dep = obj(api, "apps/v1/deployments", "keyward-zen-edge")
    assert dep["spec"]["replicas"] == 2
    assert obj(api, "policy/v1/poddisruptionbudgets", "keyward-zen-edge")["spec"]["maxUnavailable"] == 1
    assert selector(api, "edge")[POOL_LABEL] == "edge"
    assert oc.op.secret("keyward-zen-edge-tls")["tls.crt"].startswith(b"-----BEGIN CERTIFICATE")
    # The CA is not up yet: the pool is not registered, and says why.
    c = await until(lambda: cond(api, "edge", "Registered").get("reason") == "CAUnavailable"
                    and cond(api, "edge", "Registered"), 20, "Registered=False/CAUnavailable")
    assert c["status"] == "False" and oc.addr in c["message"]

    # A real CA with the server identity the operator issued: the pool gets registered.
    await oc.start_ca()
    await until(lambda: status(api, "edge").get("registered") == {"visibility": "public", "organizations": []}, 30,
                "the pool registered with the CA")
    assert cond(api, "edge", "Registered")["status"] == "True"
    pools = await asyncio.to_thread(ca_pools, oc)
    assert pools["edge"].visibility == pb.POOL_VISIBILITY_PUBLIC
    # The pool's mTLS identity is one the CA accepts as that pool.
    oc.write_identity("keyward-zen-edge-tls", "zen-edge")
    code, msg = await asyncio.to_thread(code_of, clients(oc.addr, oc.pki, "zen-edge").keys.GetKeyPair,
                                        pb.GetKeyPairRequest(org_id="no-such-org"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "ZEN pool 'edge' may not receive" in msg

    # `kubectl scale` through the CRD's scale subresource (the real kubectl 1.35).
    out = await asyncio.to_thread(kubectl, api, "scale", "zenpool/edge", "--replicas=3")
    assert "scaled" in out
    await until(lambda: obj(api, "apps/v1/deployments", "keyward-zen-edge")["spec"]["replicas"] == 3, 20,
                "the Deployment scaled to 3")
    # status.replicas is observed, not desired: what the Deployment controller reports.
    await operator_ticks(api, 2)
    assert status(api, "edge").get("replicas") != 3
    deployment_ready(api, "edge", 3)
    await until(lambda: status(api, "edge").get("replicas") == 3, 20, "status.replicas = 3")
    assert status(api, "edge")["selector"] == ("app.kubernetes.io/component=zen,app.kubernetes.io/instance=keyward,"
                                               f"app.kubernetes.io/name=keyward,{POOL_LABEL}=edge")

    # Made private for one org. A pod still on a shared node is evicted first;
    # the CA is told "private" only once no pod is left on a shared node.
    admin = clients(oc.addr, oc.pki, "platform-admin")
    await asyncio.to_thread(admin.admin.CreateOrganization,
                            pb.CreateOrganizationRequest(org_id="bank", display_name="Bank"), timeout=30)
    pod(api, "keyward-zen-edge-aaaaa", "edge", "shared-1")
    pod(api, "keyward-zen-edge-bbbbb", "edge", "bank-1")
    await api.patch(f"{ZP_URL}/edge", json={"spec": {"visibility": "private", "organizations": ["bank"]}},
                    headers={"Content-Type": "application/merge-patch+json"})
    await until(lambda: obj(api, "apps/v1/deployments", "keyward-zen-edge")["spec"]["template"]["spec"].get(
        "nodeSelector"), 20, "the Deployment moved to the dedicated nodes")
    c = await until(lambda: cond(api, "edge", "Registered").get("reason") == "WaitingForPlacement"
                    and cond(api, "edge", "Registered"), 20, "Registered=False/WaitingForPlacement")
    assert status(api, "edge")["registered"]["visibility"] == "public"  # the CA still sends it public keys only
    deployment_ready(api, "edge", 3)  # the Deployment controller: the rollout is done
    await until(lambda: status(api, "edge").get("registered") == {"visibility": "private", "organizations": ["bank"]},
                30, "the pool registered as private")
    # One dedicated node: no budget (it could only keep that node's drain from finishing).
    await until(lambda: obj(api, "policy/v1/poddisruptionbudgets", "keyward-zen-edge") is None, 20,
                "the PDB removed while the pool has a single node")
    tpl = obj(api, "apps/v1/deployments", "keyward-zen-edge")["spec"]["template"]["spec"]
    assert tpl["nodeSelector"] == {POOL_LABEL: "edge"}
    assert "affinity" not in tpl  # the public pool's "no dedicated node" affinity is gone (else: unschedulable)
    assert tpl["tolerations"] == [{"key": POOL_LABEL, "operator": "Equal", "value": "edge", "effect": "NoSchedule"}]
    assert obj(api, "v1/pods", "keyward-zen-edge-aaaaa") is None  # evicted from the shared node
    assert obj(api, "v1/pods", "keyward-zen-edge-bbbbb") is not None  # on its dedicated node: kept
    evictions = [r for r in requests(api) if str(r.url).endswith("/pods/keyward-zen-edge-aaaaa/eviction")]
    assert evictions and evictions[0].method == "POST"
    ev = await until(lambda: events(api, "PodEvicted"), 10, "a PodEvicted Event")
    assert "keyward-zen-edge-aaaaa" in ev[0]["message"] and "shared-1" in ev[0]["message"]
    pools = await asyncio.to_thread(ca_pools, oc)
    assert pools["edge"].visibility == pb.POOL_VISIBILITY_PRIVATE and list(pools["edge"].org_ids) == ["bank"]

    # Made public again while the CA is down: the pods stay on the dedicated nodes until
    # the CA has stopped treating the pool as private.
    oc.ca.stop()  # type: ignore[union-attr]
    await api.patch(f"{ZP_URL}/edge", json={"spec": {"visibility": "public", "organizations": None}},
                    headers={"Content-Type": "application/merge-patch+json"})
    c = await until(lambda: cond(api, "edge", "Placement").get("reason") == "WaitingForCA"
                    and cond(api, "edge", "Placement"), 20, "Placement=False/WaitingForCA")
    assert "still registered private" in c["message"]
    await operator_ticks(api, 3)
    tpl = obj(api, "apps/v1/deployments", "keyward-zen-edge")["spec"]["template"]["spec"]
    assert tpl["nodeSelector"] == {POOL_LABEL: "edge"}  # not moved yet
    await oc.start_ca()
    await until(lambda: status(api, "edge").get("registered") == {"visibility": "public", "organizations": []},
                30, "registered public again")
    await until(lambda: "nodeSelector" not in obj(api, "apps/v1/deployments", "keyward-zen-edge")["spec"][
        "template"]["spec"], 20, "the private placement removed")
    tpl = obj(api, "apps/v1/deployments", "keyward-zen-edge")["spec"]["template"]["spec"]
    assert "tolerations" not in tpl and tpl["affinity"]["nodeAffinity"]

    # Each spec change was applied once (scale, private, public), not again on every check
    # (a merge-patched status.applied used to keep dropped keys), and the pool owns its objects.
    await until(lambda: len(events(api, "Applied")) == 3, 10, "three Applied Events")
    await operator_ticks(api, 4)
    assert len(events(api, "Applied")) == 3
    owner = obj(api, "apps/v1/deployments", "keyward-zen-edge")["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "ZenPool" and owner["uid"] == obj(api, ZP, "edge")["metadata"]["uid"]

    # No finalizer on the pool (one that waits on the CA hangs `helm uninstall`): its objects go
    # with it through ownerReferences (the API's garbage collector: tests/e2e), and the operator
    # deregisters it from the CA on its next check.
    assert FINALIZER not in (obj(api, ZP, "edge")["metadata"].get("finalizers") or [])
    for r in ("apps/v1/deployments", "v1/services", "policy/v1/poddisruptionbudgets", "v1/secrets"):
        name = "keyward-zen-edge-tls" if r == "v1/secrets" else "keyward-zen-edge"
        assert obj(api, r, name)["metadata"]["ownerReferences"][0]["uid"] == obj(api, ZP, "edge")["metadata"]["uid"]
    await api.delete(f"{ZP_URL}/edge")
    await until(lambda: obj(api, ZP, "edge") is None, 30, "the ZenPool gone at once")
    await until(lambda: "edge" not in ca_pools(oc), 30, "the pool deregistered from the CA")
    code, msg = await asyncio.to_thread(code_of, clients(oc.addr, oc.pki, "zen-edge").keys.GetKeyPair,
                                        pb.GetKeyPairRequest(org_id="bank"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "not registered" in msg


async def test_private_spec_without_dedicated_nodes_is_refused(api: KeywardApi, operator_factory: Any) -> None:
    node(api, "shared-1")
    node(api, "half-1", dedicated_to="vault", taint=False)  # labelled but not tainted: public ZENs could land
    await operator_factory(ca_addr="127.0.0.1:1")
    await api.post(ZP_URL, json=pool("vault", visibility="private", organizations=["bank"]))
    c = await until(lambda: cond(api, "vault", "Placement").get("reason") == "Refused" and cond(api, "vault", "Placement"),
                    20, "Placement=False/Refused")
    assert c["status"] == "False"
    assert "no node is dedicated to pool vault" in c["message"] and "not the NoSchedule taint" in c["message"]
    ev = await until(lambda: events(api, "PlacementRefused"), 10, "a PlacementRefused Event")
    assert ev[0]["type"] == "Warning" and "label and taint nodes" in ev[0]["message"]
    assert obj(api, "apps/v1/deployments", "keyward-zen-vault") is None  # nothing ran
    # The platform team taints the node: the pool is placed on the next check.
    api.objects["v1/nodes", None, "half-1"].patch(
        {"spec": {"taints": [{"key": POOL_LABEL, "value": "vault", "effect": "NoSchedule"}]}})
    dep = await until(lambda: obj(api, "apps/v1/deployments", "keyward-zen-vault"), 20, "the Deployment, once placed")
    assert dep["spec"]["template"]["spec"]["nodeSelector"] == {POOL_LABEL: "vault"}
    await until(lambda: cond(api, "vault", "Placement").get("status") == "True", 20, "Placement=True")
    assert len(events(api, "PlacementRefused")) == 1  # reported once, not every check


async def test_bypass_switch_and_return(api: KeywardApi, operator_ca: Any) -> None:
    node(api, "shared-1")
    node(api, "vault-1", dedicated_to="vault")
    ca_endpoint(api, ready=True)
    oc: OperatorCA = await operator_ca()
    admin = clients(oc.addr, oc.pki, "platform-admin")
    # A fail-closed org served only by the private pool "vault".
    await asyncio.to_thread(admin.admin.CreateOrganization, pb.CreateOrganizationRequest(
        org_id="strict", policy=pb.Policy(private_zen_only=True, fail_mode=pb.FAIL_MODE_CLOSED)), timeout=30)
    await api.post(ZP_URL, json=pool("edge", visibility="public"))
    await api.post(ZP_URL, json=pool("vault", visibility="private", organizations=["strict"]))
    await until(lambda: obj(api, "apps/v1/deployments", "keyward-zen-vault"), 20, "vault's Deployment")
    deployment_ready(api, "vault", 2)  # rolled out on its dedicated node: it may be registered private
    await until(lambda: status(api, "edge").get("servesFailClosedOrg") is False, 30, "edge: no fail-closed org")
    await until(lambda: status(api, "vault").get("servesFailClosedOrg") is True, 30, "vault: serves a fail-closed org")
    zen_sel = selector(api, "edge")
    deployment_ready(api, "edge", 2)
    deployment_ready(api, "vault", 2)

    # Only the CA down: the ZENs keep serving on cached keys; no bypass.
    ca_endpoint(api, ready=False)
    oc.ca.stop()  # type: ignore[union-attr]
    await operator_ticks(api, 6)
    assert selector(api, "edge") == zen_sel and not status(api, "edge").get("bypass")

    # Both planes down: the public pool's Service goes to the bypass relay...
    deployment_ready(api, "edge", 0)
    deployment_ready(api, "vault", 0)
    await until(lambda: status(api, "edge").get("bypass") is True, 20, "edge bypassed")
    assert selector(api, "edge") == {"app.kubernetes.io/name": "keyward", "app.kubernetes.io/component": "bypass",
                                     "app.kubernetes.io/instance": "keyward"}
    assert cond(api, "edge", "Bypass")["status"] == "True"
    on = await until(lambda: events(api, "BypassOn"), 10, "a BypassOn Event")
    assert len(on) == 1 and "keyward-zen" not in on[0]["message"] and "nothing decrypted" in on[0]["message"]
    # ...but the pool with a fail-closed org is never bypassed.
    await until(lambda: cond(api, "vault", "Bypass").get("reason") == "FailClosed", 20, "vault: FailClosed")
    assert not status(api, "vault").get("bypass") and selector(api, "vault")[POOL_LABEL] == "vault"

    # A ZEN of the pool is ready again: straight back.
    deployment_ready(api, "edge", 1)
    await until(lambda: status(api, "edge").get("bypass") is False, 20, "edge back on its ZENs")
    assert selector(api, "edge") == zen_sel
    off = await until(lambda: events(api, "BypassOff"), 10, "a BypassOff Event")
    assert "a ZEN of the pool is ready again" in off[0]["message"]

    # Down again, then the CA comes back first: back as well.
    deployment_ready(api, "edge", 0)
    await until(lambda: status(api, "edge").get("bypass") is True, 20, "edge bypassed again")
    ca_endpoint(api, ready=True)
    await until(lambda: status(api, "edge").get("bypass") is False, 20, "edge back once the CA is ready")
    assert selector(api, "edge") == zen_sel
    off = await until(lambda: len(events(api, "BypassOff")) == 2 and events(api, "BypassOff"), 10, "a 2nd BypassOff")
    assert "the CA is ready again" in off[-1]["message"]
