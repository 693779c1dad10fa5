"""The chart on a kind-like cluster (one node, no zone labels), as a platform engineer runs it.

In order, on one release: install with default values (every pod admitted under PodSecurity
``restricted`` and scheduled, the operator issues the PKI, the CA creates its schema although it
starts before Postgres answers, and turns ready, the default pool registers), `kubectl scale`,
`helm upgrade` after the scale, `kubectl drain`, and `helm uninstall`.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.cluster import ROOT, Cluster
from tests.e2e.conftest import CHART, NS, RELEASE, TOOLS, Kubectl, set_layout, wait
from tests.e2e.kubelet import Kubelet

GRPCURL = ROOT / ".venv" / "bin" / "grpcurl"


def pods(kubectl: Kubectl, component: str | None = None) -> list[dict[str, Any]]:
    sel = ["-l", f"app.kubernetes.io/component={component}"] if component else []
    items: list[dict[str, Any]] = kubectl.json("pods", "-n", NS, *sel)["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def ready(p: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in (p.get("status") or {}).get("conditions") or [])


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def secret_files(kubectl: Kubectl, name: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    s = kubectl.json("secret", "-n", NS, name)
    for k, v in s["data"].items():
        (dest / k).write_bytes(base64.b64decode(v))
    return dest


def grpcurl(kubectl: Kubectl, ip: str, method: str, data: str = "{}") -> Any:
    """As the platform admin whose identity the operator issued, straight to a CA pod."""
    d = secret_files(kubectl, f"{RELEASE}-admin-tls", kubectl.cluster.root / "admin-tls")
    r = subprocess.run([str(GRPCURL), "-cacert", str(d / "ca.crt"), "-cert", str(d / "tls.crt"), "-key",
                        str(d / "tls.key"), "-authority", f"{RELEASE}-ca", "-d", data, f"{ip}:50051", method],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def install(cluster: Cluster, kubelet: Kubelet, kubectl: Kubectl) -> dict[str, Any]:
    set_layout(cluster, "kind")
    # Postgres starts only once the CA runs and has found no database: the CA must create the schema
    # when Postgres comes, without a restart.
    kubelet.hold.add("postgres")
    started = time.monotonic()
    proc = subprocess.Popen([str(TOOLS / "helm"), "install", RELEASE, str(CHART), "-n", NS, "--create-namespace",
                             "--wait", "--timeout", "6m"], env=kubectl.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        def ca_waited_for_db() -> bool:
            cas = [r for r in list(kubelet.pods.values()) if r.name.startswith(f"{RELEASE}-ca-")]
            return len(cas) == 2 and all(r.log.exists() and "could not ensure the schema" in r.log.read_text(
                errors="replace") for r in cas)
        wait(ca_waited_for_db, 180, "the CA pods to start and find no database")
        kubelet.hold.discard("postgres")
        stdout, stderr = proc.communicate(timeout=430)
    finally:
        if proc.poll() is None:  # a failed wait above: no helm left behind the test
            proc.kill()
            proc.communicate()
    return {"helm": subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr),
            "seconds": time.monotonic() - started}


def test_install_with_default_values(install: dict[str, Any], kubectl: Kubectl, kubelet: Kubelet) -> None:
    r = install["helm"]
    assert r.returncode == 0, f"helm install failed:\n{r.stdout}\n{r.stderr}"
    ns = kubectl.json("namespace", NS)
    # Every pod admitted under the namespace's PodSecurity level (the cluster's default: restricted).
    assert not [e for e in kubectl.events(NS, "FailedCreate") if "PodSecurity" in e.get("message", "")]
    assert ns["metadata"]["name"] == NS
    all_pods = pods(kubectl)
    assert all(p["spec"].get("nodeName") for p in all_pods), [p["metadata"]["name"] for p in all_pods]
    counts = {c: len(pods(kubectl, c)) for c in ("postgres", "ca", "operator", "bypass", "zen")}
    assert counts == {"postgres": 3, "ca": 2, "operator": 1, "bypass": 1, "zen": 2}, counts
    # A fresh install loses no primary: Postgres started after the operator, and nothing was reported
    # as lost before a primary was ever seen.
    assert not kubectl.events(NS, "PrimaryLost") and not kubectl.events(NS, "FailoverRefused")
    # The operator issued the platform PKI and the pool's identity.
    for s in ("pki-root", "ca-tls", "admin-tls", "zen-public-tls"):
        kubectl.json("secret", "-n", NS, f"{RELEASE}-{s}")
    # The CA created its schema once Postgres answered, with no restart, and is ready for real.
    for run in (r for r in kubelet.pods.values() if r.name.startswith(f"{RELEASE}-ca-")):
        # Ready may come first: the other CA's schema is enough for serving; this one's own attempt
        # (CREATE ... IF NOT EXISTS) completes on its next period.
        log = wait(lambda: "schema ensured" in (t := run.log.read_text(errors="replace")) and t,  # noqa: B023 (polled now)
                   30, f"{run.name} to ensure the schema")
        assert log.index("could not ensure the schema") < log.index("schema ensured"), log[-2000:]
        assert run.restarts == 0
        # Every connection gets the password file's password (the event hub's LISTEN one too).
        wait(lambda: "health: SERVING" in run.log.read_text(), 30,  # noqa: B023 (polled within this iteration)
             "the CA to report SERVING")
        after = run.log.read_text(errors="replace").split("schema ensured", 1)[1]
        assert "database unavailable" not in after, after[-1500:]
    cas = pods(kubectl, "ca")
    assert all(ready(p) for p in cas)
    # The default pool is registered with the CA (the operator's condition, and the CA's own word).
    zp = wait(lambda: (z := kubectl.json("zenpool", "-n", NS, "public"))
              and condition(z, "Registered").get("status") == "True" and z, 60, "pool public registered")
    assert zp["status"]["registered"] == {"visibility": "public", "organizations": []}
    listed = grpcurl(kubectl, cas[0]["status"]["podIP"], "keyward.v1.Admin/ListZenPools")
    assert [p["name"] for p in listed.get("pools", [])] == ["public"], listed


def pool_pods(kubectl: Kubectl, pool: str) -> list[dict[str, Any]]:
    return [p for p in pods(kubectl, "zen") if (p["metadata"].get("labels") or {}).get("keyward.io/zen-pool") == pool]


def test_kubectl_scale_counts_real_pods(install: dict[str, Any], kubectl: Kubectl) -> None:
    r = kubectl("scale", "-n", NS, "zenpool/public", "--replicas=3")
    assert "scaled" in r.stdout

    def three() -> bool:
        z = kubectl.json("zenpool", "-n", NS, "public")
        ps = pool_pods(kubectl, "public")
        return (len(ps) == 3 and all(p["status"].get("phase") == "Running" and ready(p) for p in ps)
                and z["status"].get("replicas") == 3 and z["status"].get("readyReplicas") == 3)
    wait(three, 120, "3 ZEN pods Running and Ready, counted in the ZenPool's status")
    lines = kubectl("get", "zenpools", "-n", NS).stdout.splitlines()
    assert lines[0].split() == ["NAME", "VISIBILITY", "DESIRED", "READY", "BYPASS", "AGE"], lines
    assert lines[1].split()[:5] == ["public", "public", "3", "3", "false"], lines


def test_helm_upgrade_after_the_scale_keeps_it(install: dict[str, Any], kubectl: Kubectl) -> None:
    r = kubectl.helm("upgrade", RELEASE, str(CHART), "-n", NS, "--wait", "--timeout", "4m", timeout=300)
    assert "conflict" not in (r.stdout + r.stderr).lower()
    assert kubectl.json("zenpool", "-n", NS, "public")["spec"]["replicas"] == 3
    gen = kubectl.json("zenpool", "-n", NS, "public")["metadata"]["generation"]
    # The operator has seen the upgraded pool, and still runs 3 ZENs.
    wait(lambda: kubectl.json("zenpool", "-n", NS, "public")["status"].get("observedGeneration") == gen,
         60, "the operator to observe the pool after the upgrade")
    dep = kubectl.json("deployment", "-n", NS, f"{RELEASE}-zen-public")
    assert dep["spec"]["replicas"] == 3


def test_bypass_when_the_ca_and_the_pools_zens_are_not_ready(install: dict[str, Any], kubectl: Kubectl,
                                                            kubelet: Kubelet, cluster: Cluster) -> None:
    svc = f"{RELEASE}-zen-public"
    assert kubectl.json("service", "-n", NS, svc)["spec"]["selector"]["app.kubernetes.io/component"] == "zen"
    down = [p["metadata"]["name"] for p in pods(kubectl, "ca") + pool_pods(kubectl, "public")]

    def set_ready(ok: bool) -> None:
        s = "True" if ok else "False"
        for name in down:
            cluster.request("PATCH", f"/api/v1/namespaces/{NS}/pods/{name}/status",
                            {"status": {"conditions": [{"type": "Ready", "status": s},
                                                       {"type": "ContainersReady", "status": s}]}},
                            ctype="application/strategic-merge-patch+json")
    kubelet.paused.update(down)
    try:
        set_ready(False)

        def bypassed() -> bool:
            sel = kubectl.json("service", "-n", NS, svc)["spec"]["selector"]
            return sel.get("app.kubernetes.io/component") == "bypass" and \
                sel.get("app.kubernetes.io/instance") == RELEASE
        try:
            wait(bypassed, 60, "the pool's Service to select the bypass relay")
        except AssertionError:
            z = kubectl.json("zenpool", "-n", NS, "public")
            state = [(p["metadata"]["name"], ready(p)) for p in pods(kubectl)]
            op = next(r.log for r in kubelet.pods.values() if r.name.startswith(f"{RELEASE}-operator"))
            raise AssertionError(f"no bypass: status={z.get('status')} pods={state} down={down}\n"
                                 f"operator: {op.read_text(errors='replace')[-3000:]}") from None
        z = kubectl.json("zenpool", "-n", NS, "public")
        assert z["status"]["bypass"] is True and condition(z, "Bypass")["status"] == "True"
        assert kubectl.events(NS, "BypassOn")
        # Traffic would reach the relay: the Service's endpoints are the relay's pods.
        relay = {p["status"]["podIP"] for p in pods(kubectl, "bypass")}
        wait(lambda: relay == {a for s in kubectl.json("endpointslices", "-n", NS, "-l",
                                                        f"kubernetes.io/service-name={svc}")["items"]
                               for e in s.get("endpoints") or [] for a in e["addresses"]},
             60, "the pool Service's endpoints to be the bypass relay's")
        set_ready(True)
        wait(lambda: kubectl.json("service", "-n", NS, svc)["spec"]["selector"].get(
            "app.kubernetes.io/component") == "zen", 60, "the Service to point back at the ZENs")
        assert kubectl.events(NS, "BypassOff")
    finally:
        kubelet.paused.difference_update(down)


def test_drain_the_node(install: dict[str, Any], kubectl: Kubectl) -> None:
    # On one node a PodDisruptionBudget protects nothing and would keep the drain from finishing:
    # neither the chart (CA, Postgres) nor the operator (ZEN pools) makes one here.
    assert kubectl.json("pdb", "-n", NS)["items"] == []
    r = kubectl("drain", "kind-control-plane", "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=150s",
                timeout=200, check=False)
    kubectl("uncordon", "kind-control-plane")
    assert r.returncode == 0, f"drain did not complete:\n{r.stdout}\n{r.stderr}"


def test_helm_uninstall_then_the_namespace_goes(install: dict[str, Any], kubectl: Kubectl) -> None:
    t0 = time.monotonic()
    kubectl.helm("uninstall", RELEASE, "-n", NS, "--wait", "--timeout", "60s", timeout=90)
    took = time.monotonic() - t0
    assert took < 60, took
    kubectl("delete", "namespace", NS, "--wait=false")
    wait(lambda: kubectl("get", "namespace", NS, check=False).returncode != 0, 90,
         "the namespace to be deleted (nothing left Terminating)")
    # The CRD stays (Helm never deletes CRDs from crds/), and with it any ZenPools elsewhere.
    assert kubectl.json("crd", "zenpools.keyward.io")["metadata"]["name"] == "zenpools.keyward.io"
