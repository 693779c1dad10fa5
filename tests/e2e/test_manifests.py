"""k8s/keyward.yaml, for users without Helm: applied with kubectl to a cluster that has never seen
keyward (no CRD, no namespace), following k8s/README.md's steps, it comes up as the chart does."""

from __future__ import annotations

import os
import subprocess

from tests.e2e.cluster import ROOT, Cluster
from tests.e2e.conftest import NS, RELEASE, TOOLS, Kubectl, set_layout, wait
from tests.e2e.kubelet import Kubelet
from tests.e2e.test_kind import condition, pods, pool_pods, ready


def test_plain_manifests_on_a_fresh_cluster(cluster: Cluster, kubelet: Kubelet, kubectl: Kubectl) -> None:
    set_layout(cluster, "kind")
    kubectl("delete", "crd", "zenpools.keyward.io", "--ignore-not-found", "--timeout=60s")
    assert kubectl("get", "namespace", NS, check=False).returncode != 0
    kubectl("create", "namespace", NS)
    env = {**kubectl.env, "PATH": f"{TOOLS}:{os.environ['PATH']}"}
    subprocess.run(["bash", str(ROOT / "k8s" / "create-secret.sh"), NS], env=env, check=True, capture_output=True)
    manifests = ROOT / "k8s" / "keyward.yaml"
    r = kubectl("apply", "-n", NS, "-f", str(manifests), check=False)
    assert r.returncode == 0, f"kubectl apply failed:\n{r.stdout}\n{r.stderr}"
    try:
        wait(lambda: len(pods(kubectl, "ca")) == 2 and all(ready(p) for p in pods(kubectl, "ca")), 240,
             "the CA pods to be ready")
        z = wait(lambda: (p := kubectl.json("zenpool", "-n", NS, "public"))
                 and condition(p, "Registered").get("status") == "True" and p, 120, "pool public registered")
        assert z["status"]["registered"]["visibility"] == "public"
        wait(lambda: len(pool_pods(kubectl, "public")) == 2 and all(ready(p) for p in pool_pods(kubectl, "public")),
             120, "the public pool's ZENs ready")
    finally:
        kubectl("delete", "-n", NS, "-f", str(manifests), "--wait=false", check=False)
        kubectl("delete", "namespace", NS, "--timeout=120s", check=False, timeout=150)
    assert RELEASE == "keyward"  # the manifests are rendered for release "keyward"
