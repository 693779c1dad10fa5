"""The operator's building blocks, as pure functions over plain dicts.

* What a ZenPool becomes: a Deployment, a Service and a PodDisruptionBudget.
* Private-ZEN-only placement: a private pool runs only on nodes labelled and
  tainted ``keyward.io/zen-pool=<pool>``, never beside a public ZEN.
* Registration order, misplaced pods, conditions.

``plan`` composes them into one pass's plan (and holds the bypass rule); the
database failover's decisions are ``dbops.plan``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

POOL_LABEL = "keyward.io/zen-pool"
Obj = dict[str, Any]


@dataclass(frozen=True)
class Release:
    name: str  # the chart's fullname, e.g. "keyward"
    namespace: str
    image: str  # keyward/zen:TAG
    trust_domain: str = "keyward"
    instance: str = ""  # the Helm release name (app.kubernetes.io/instance); default: from ``name``
    secrets: str = ""  # the Secret holding master-secret (chart: secrets.existingSecret); default <name>-secrets

    @property
    def instance_label(self) -> str:
        return self.instance or self.name.removesuffix("-keyward")

    @property
    def secret_name(self) -> str:
        return self.secrets or f"{self.name}-secrets"


def _labels(rel: Release, pool: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "keyward", "app.kubernetes.io/instance": rel.instance_label,
            "app.kubernetes.io/component": "zen", POOL_LABEL: pool}


def pool_deployment(rel: Release, pool: str, spec: Obj, resources: Obj | None = None) -> Obj:
    private = spec.get("visibility") == "private"
    labels = _labels(rel, pool)
    pod: Obj = {
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": "zen",
            "image": rel.image,
            "env": [
                {"name": "KEYWARD_ZEN_LISTEN", "value": "0.0.0.0:8080"},
                {"name": "KEYWARD_ZEN_METRICS_LISTEN", "value": "0.0.0.0:9465"},
                {"name": "KEYWARD_CA_ADDR", "value": f"{rel.name}-ca:50051"},
                {"name": "KEYWARD_ZEN_TLS_CERT_FILE", "value": "/run/keyward/tls/tls.crt"},
                {"name": "KEYWARD_ZEN_TLS_KEY_FILE", "value": "/run/keyward/tls/tls.key"},
                {"name": "KEYWARD_ZEN_CA_TRUST_FILE", "value": "/run/keyward/tls/ca.crt"},
                {"name": "KEYWARD_MASTER_SECRET_FILE", "value": "/run/keyward/secret/master-secret"},
            ],
            "ports": [{"name": "proxy", "containerPort": 8080}, {"name": "metrics", "containerPort": 9465}],
            # /healthz is 503 when a key could not be held safely (memory not lockable while
            # KEYWARD_REQUIRE_MLOCK is on): such a ZEN gets no traffic, the others keep it.
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 5},
            # No capability: PodSecurity `restricted` admits none but NET_BIND_SERVICE. The key buffers
            # and the signer lock their memory within RLIMIT_MEMLOCK instead.
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}},
            "resources": resources or {"requests": {"cpu": "100m", "memory": "128Mi"},
                                       "limits": {"cpu": "2", "memory": "512Mi"}},
            "volumeMounts": [{"name": "tls", "mountPath": "/run/keyward/tls", "readOnly": True},
                             {"name": "secret", "mountPath": "/run/keyward/secret", "readOnly": True},
                             {"name": "tmp", "mountPath": "/tmp"}],
        }],
        "volumes": [
            {"name": "tls", "secret": {"secretName": f"{rel.name}-zen-{pool}-tls", "defaultMode": 0o400}},
            {"name": "secret", "secret": {"secretName": rel.secret_name, "defaultMode": 0o400,
                                          "items": [{"key": "master-secret", "path": "master-secret"}]}},
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
        ],
    }
    if private:
        pod["nodeSelector"] = {**spec.get("nodeSelector", {}), POOL_LABEL: pool}
        pod["tolerations"] = [{"key": POOL_LABEL, "operator": "Equal", "value": pool, "effect": "NoSchedule"}]
    else:
        if spec.get("nodeSelector"):
            pod["nodeSelector"] = dict(spec["nodeSelector"])
        # Public ZENs stay off nodes dedicated to a private pool.
        pod["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": POOL_LABEL, "operator": "DoesNotExist"}]}]}}}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": f"{rel.name}-zen-{pool}", "namespace": rel.namespace, "labels": labels},
        "spec": {"replicas": int(spec.get("replicas", 2)), "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": pod}},
    }


def pool_service(rel: Release, pool: str, bypassed: bool) -> Obj:
    """The pool's Service; while bypassed it selects the bypass relay instead of the ZENs."""
    # The bypass relay of this release only: another release's relay in the namespace is not ours.
    selector = ({"app.kubernetes.io/name": "keyward", "app.kubernetes.io/instance": rel.instance_label,
                 "app.kubernetes.io/component": "bypass"} if bypassed else _labels(rel, pool))
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"{rel.name}-zen-{pool}", "namespace": rel.namespace, "labels": _labels(rel, pool)},
            "spec": {"selector": selector, "ports": [{"name": "proxy", "port": 8080, "targetPort": 8080}]}}


def pool_pdb(rel: Release, pool: str) -> Obj:
    """One ZEN at a time may be drained, whatever the pool's size.

    ``maxUnavailable: 0`` for a 1-replica pool would block every eviction, so
    ``kubectl drain`` of its node would never finish. A 1-replica pool has
    chosen no redundancy: while its ZEN moves, the CA still decides, and the
    bypass relay covers the gap only if both planes are down."""
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": f"{rel.name}-zen-{pool}", "namespace": rel.namespace, "labels": _labels(rel, pool)},
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _labels(rel, pool)}}}


def eligible_nodes(pool: str, spec: Obj, nodes: list[Obj]) -> list[str]:
    """The nodes the pool's pods may run on (cordoned ones included: a cordon is temporary;
    tainted ones not, unless the taint is the private pool's own)."""
    private = spec.get("visibility") == "private"
    sel = spec.get("nodeSelector") or {}

    def fits(n: Obj) -> bool:
        labels = n.get("metadata", {}).get("labels") or {}
        if any(labels.get(k) != v for k, v in sel.items() if k != POOL_LABEL):
            return False
        # Taints that keep the pool's pods off (a control-plane node's, for one): a private pool
        # tolerates only its own.
        for t in (n.get("spec") or {}).get("taints") or []:
            if t.get("effect") in ("NoSchedule", "NoExecute") and not (
                    private and t.get("key") == POOL_LABEL and t.get("value") == pool):
                return False
        return _dedicated_to(n) == pool if private else POOL_LABEL not in labels
    return [n["metadata"]["name"] for n in nodes if fits(n)]


def pdb_wanted(pool: str, spec: Obj, nodes: list[Obj]) -> bool:
    """A PodDisruptionBudget only where it can protect something: with a single node to run on,
    draining that node stops the pool whatever the budget says, and a budget would only keep the
    drain from ever finishing (its evicted ZENs have nowhere to go)."""
    return len(eligible_nodes(pool, spec, nodes)) >= 2


def _dedicated_to(node: Obj) -> str | None:
    pool = (node.get("metadata", {}).get("labels") or {}).get(POOL_LABEL)
    if pool is None:
        return None
    tainted = any(t.get("key") == POOL_LABEL and t.get("value") == pool and t.get("effect") == "NoSchedule"
                  for t in node.get("spec", {}).get("taints") or [])
    return pool if tainted else None


def placement_problems(pool: str, spec: Obj, nodes: list[Obj]) -> list[str]:
    """Why a private pool cannot be placed safely (empty: fine)."""
    if spec.get("visibility") != "private":
        return []
    problems = []
    sel = spec.get("nodeSelector") or {}
    if sel.get(POOL_LABEL, pool) != pool:
        problems.append(f"nodeSelector {POOL_LABEL}={sel[POOL_LABEL]} would place pool {pool} on another pool's nodes")
    dedicated = [n for n in nodes if _dedicated_to(n) == pool]
    if not dedicated:
        problems.append(f"no node is dedicated to pool {pool}: label and taint nodes with "
                        f"{POOL_LABEL}={pool} (taint effect NoSchedule)")
    half = [n["metadata"]["name"] for n in nodes
            if (n.get("metadata", {}).get("labels") or {}).get(POOL_LABEL) == pool and _dedicated_to(n) != pool]
    if half:
        problems.append(f"node(s) {', '.join(half)} carry the {POOL_LABEL}={pool} label but not the NoSchedule "
                        "taint, so public ZENs could share them")
    return problems


def misplaced_pods(pool: str, spec: Obj, pods: list[Obj], nodes: list[Obj]) -> list[str]:
    """Names of this private pool's pods running on a node not dedicated to it (to evict)."""
    if spec.get("visibility") != "private":
        return []
    owner = {n["metadata"]["name"]: _dedicated_to(n) for n in nodes}
    return [p["metadata"]["name"] for p in pods
            if (p.get("metadata", {}).get("labels") or {}).get(POOL_LABEL) == pool
            and p.get("spec", {}).get("nodeName")
            and owner.get(p["spec"]["nodeName"]) != pool]


def pool_labels(rel: Release, pool: str) -> dict[str, str]:
    return _labels(rel, pool)


def registration(spec: Obj) -> tuple[str, list[str]]:
    """What the CA must know of a pool: visibility and, if private, its orgs."""
    vis = "private" if spec.get("visibility") == "private" else "public"
    return vis, sorted(set(spec.get("organizations") or [])) if vis == "private" else []


def may_register(pool: str, spec: Obj, pods: list[Obj], nodes: list[Obj], deployment: Obj | None = None) -> str:
    """Why the CA must not be told yet that the pool is private (empty: go ahead).

    A pool made private is registered private only once its rollout onto the
    dedicated nodes is complete and no pod of it is left anywhere else: not
    one still terminating after eviction, not one still pending (an old
    ReplicaSet's pod could land on a shared node). Until then the CA keeps
    treating the pool as public, so a private org's key never reaches a
    shared node."""
    if spec.get("visibility") != "private":
        return ""
    owner = {n["metadata"]["name"]: _dedicated_to(n) for n in nodes}
    mine = [p for p in pods if (p.get("metadata", {}).get("labels") or {}).get(POOL_LABEL) == pool]
    left = sorted(p["metadata"]["name"] for p in mine
                  if p.get("spec", {}).get("nodeName") and owner.get(p["spec"]["nodeName"]) != pool)
    if left:
        return f"waiting for pod(s) {', '.join(left)} to leave nodes not dedicated to the pool"
    pending = sorted(p["metadata"]["name"] for p in mine if not p.get("spec", {}).get("nodeName"))
    if pending:
        return f"waiting for pod(s) {', '.join(pending)} to be scheduled"
    if deployment is not None:
        want = int((deployment.get("spec") or {}).get("replicas", 0))
        st = deployment.get("status") or {}
        gen = int((deployment.get("metadata") or {}).get("generation") or 0)
        if int(st.get("observedGeneration") or 0) < gen or int(st.get("updatedReplicas") or 0) < want \
                or int(st.get("replicas") or 0) > want:
            return "waiting for the rollout onto the dedicated nodes to complete"
    return ""


def set_condition(conditions: list[Obj], type_: str, ok: bool, reason: str, message: str, now: str) -> list[Obj]:
    """Conditions with ``type_`` set; lastTransitionTime moves only when the status does."""
    status = "True" if ok else "False"
    out = [c for c in conditions if c.get("type") != type_]
    old = next((c for c in conditions if c.get("type") == type_), None)
    since = old["lastTransitionTime"] if old and old.get("status") == status and old.get("lastTransitionTime") else now
    out.append({"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": since})
    return sorted(out, key=lambda c: str(c["type"]))


PLACEMENT_KEYS = ("nodeSelector", "tolerations", "affinity")


def prune_placement(old_pod: Obj, new_pod: Obj) -> None:
    """Make ``new_pod`` a merge patch that also removes the old placement it lacks.

    A JSON merge patch keeps every key it does not name, so a public pool made
    private would keep its "no dedicated node" affinity next to its new
    nodeSelector (unschedulable), and a private pool made public would keep
    its nodeSelector. Explicit nulls remove them."""
    for k in PLACEMENT_KEYS:
        if k in old_pod and k not in new_pod:
            new_pod[k] = None
    old_sel, new_sel = old_pod.get("nodeSelector") or {}, new_pod.get("nodeSelector")
    if isinstance(new_sel, dict):
        for k in old_sel:
            new_sel.setdefault(k, None)


def widens_placement(registered: Obj | None, spec: Obj) -> bool:
    """A private pool made public: its pods may leave the dedicated nodes only
    after the CA stops treating it as private, or a ZEN on a shared node could
    still fetch a private org's key. (Narrowing needs no such order: the pods
    move to dedicated nodes first, see :func:`may_register`.)"""
    return bool(registered) and (registered or {}).get("visibility") == "private" \
        and spec.get("visibility") != "private"
