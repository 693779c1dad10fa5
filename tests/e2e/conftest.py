"""Fixtures of the e2e suite: one real control plane for the session (see ``cluster``), the kubelet
stand-in that runs our pods (``kubelet``), node layouts, and the real helm and kubectl.

Only ``make e2e`` runs this folder (inside the run's network namespace); a plain ``pytest`` skips it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.cluster import ROOT, Cluster, in_netns
from tests.e2e.kubelet import Kubelet

if not in_netns():
    collect_ignore_glob = ["test_*.py"]

TOOLS = ROOT / ".tools" / "bin"
NS = "keyward"
RELEASE = "keyward"
CHART = ROOT / "helm" / "keyward"
ZONES = ("a", "b", "c")


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="keyward-e2e-", dir="/dev/shm"))
    c = Cluster(root)
    try:
        c.start()
        # A default StorageClass whose claims the kubelet stand-in binds to host folders.
        c.request("POST", "/apis/storage.k8s.io/v1/storageclasses", {
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": "standard",
                         "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
            "provisioner": "keyward.io/e2e-local", "volumeBindingMode": "WaitForFirstConsumer",
            "reclaimPolicy": "Delete"})
        yield c
    finally:
        c.stop()
        if os.environ.get("KEYWARD_E2E_KEEP"):
            print(f"e2e cluster files kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def kubelet(cluster: Cluster) -> Iterator[Kubelet]:
    k = Kubelet(cluster, cluster.root / "kubelet")
    k.start()
    yield k
    k.stop()


class Kubectl:
    """The real kubectl and helm (``make tools``) against the e2e cluster's admin kubeconfig."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        home = cluster.root / "helm-home"
        home.mkdir(exist_ok=True)
        self.env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "HELM_CACHE_HOME": str(home / "cache"),
                    "HELM_CONFIG_HOME": str(home / "config"), "HELM_DATA_HOME": str(home / "data")}

    def run(self, tool: str, *args: str, check: bool = True, timeout: float = 180,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([str(TOOLS / tool), *args], env=self.env, capture_output=True, text=True,
                           timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def __call__(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run("kubectl", *args, **kw)

    def helm(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run("helm", *args, **kw)

    def json(self, *args: str) -> Any:
        return json.loads(self("get", *args, "-o", "json").stdout)

    def events(self, ns: str, reason: str | None = None) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.json("events", "-n", ns)["items"]
        return [e for e in items if reason is None or e.get("reason") == reason]


@pytest.fixture(scope="session")
def kubectl(cluster: Cluster) -> Kubectl:
    return Kubectl(cluster)


def wait(pred: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll ``pred`` until truthy; fail after ``timeout`` seconds (every wait is bounded)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            v = pred()
        except (AssertionError, subprocess.SubprocessError, RuntimeError, KeyError) as e:
            v, last = None, e
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}" + (f" (last: {last})" if last else ""))
        time.sleep(interval)


# -- node layouts -----------------------------------------------------------------------------------------

def _node(name: str, labels: dict[str, str], taints: list[dict[str, str]] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake"},
                         "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                                    "kubernetes.io/arch": "amd64", "type": "kwok", **labels}},
            "spec": {"taints": taints or []},
            "status": {"allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110"},
                       "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110"}}}


LAYOUTS: dict[str, list[dict[str, Any]]] = {
    # kind's one node: no zone labels.
    "kind": [_node("kind-control-plane", {})],
    # Three zones, and one node dedicated to the private pool "bank" (docs/operator.md).
    "zones": [*(_node(f"zone-{z}", {"topology.kubernetes.io/zone": f"zone-{z}"}) for z in ZONES),
              _node("dedicated-bank", {"topology.kubernetes.io/zone": "zone-a", "keyward.io/zen-pool": "bank"},
                    [{"key": "keyward.io/zen-pool", "value": "bank", "effect": "NoSchedule"}])],
}


def set_layout(cluster: Cluster, name: str) -> list[str]:
    """Replace the cluster's nodes with the layout's; wait until kwok reports them Ready."""
    want = LAYOUTS[name]
    for n in (cluster.request("GET", "/api/v1/nodes") or {}).get("items", []):
        if n["metadata"]["name"] not in {w["metadata"]["name"] for w in want}:
            cluster.request("DELETE", f"/api/v1/nodes/{n['metadata']['name']}")
    for w in want:
        if cluster.request("GET", f"/api/v1/nodes/{w['metadata']['name']}") is None:
            cluster.request("POST", "/api/v1/nodes", w)

    def ready() -> bool:
        nodes = (cluster.request("GET", "/api/v1/nodes") or {}).get("items", [])
        return len(nodes) == len(want) and all(
            any(c["type"] == "Ready" and c["status"] == "True" for c in (n.get("status") or {}).get("conditions") or [])
            for n in nodes)
    wait(ready, 60, f"the {name} layout's nodes to be Ready")
    return [w["metadata"]["name"] for w in want]
