"""A read-only Kubernetes API stand-in for the real helm binary's ``lookup``.

``helm template --dry-run=server`` asks the cluster for its version and API
discovery, then GETs each object a template looks up. This serves exactly
that over plain HTTP on loopback, from a dict of objects, so the chart's
lookups (the live ZenPool's replicas, the kept Secret) are rendered by helm
itself. Anything else is a 404 Status, as the API server answers.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# group/version -> [(plural, kind, namespaced)]
RESOURCES: dict[str, list[tuple[str, str, bool]]] = {
    "v1": [("secrets", "Secret", True), ("configmaps", "ConfigMap", True), ("services", "Service", True),
           ("serviceaccounts", "ServiceAccount", True), ("namespaces", "Namespace", False),
           ("nodes", "Node", False)],
    "keyward.io/v1alpha1": [("zenpools", "ZenPool", True)],
    "apps/v1": [("deployments", "Deployment", True), ("statefulsets", "StatefulSet", True)],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    "networking.k8s.io/v1": [("networkpolicies", "NetworkPolicy", True)],
    "rbac.authorization.k8s.io/v1": [("roles", "Role", True), ("rolebindings", "RoleBinding", True),
                                     ("clusterroles", "ClusterRole", False),
                                     ("clusterrolebindings", "ClusterRoleBinding", False)],
    "apiextensions.k8s.io/v1": [("customresourcedefinitions", "CustomResourceDefinition", False)],
    "monitoring.coreos.com/v1": [("podmonitors", "PodMonitor", True)],
}


def _url(api_version: str, plural: str, ns: str | None, name: str) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{base}/namespaces/{ns}/{plural}/{name}" if ns else f"{base}/{plural}/{name}"


class _Handler(BaseHTTPRequestHandler):
    objects: dict[str, dict[str, Any]] = {}
    minor = "35"

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        p = self.path.split("?", 1)[0].rstrip("/")
        if p == "/version":
            return self._send(200, {"major": "1", "minor": self.minor, "gitVersion": f"v1.{self.minor}.0",
                                    "platform": "linux/amd64"})
        if p == "/api":
            return self._send(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:443"}]})
        if p == "/apis":
            groups = [{"name": gv.split("/")[0], "versions": [{"groupVersion": gv, "version": gv.split("/")[1]}],
                       "preferredVersion": {"groupVersion": gv, "version": gv.split("/")[1]}}
                      for gv in RESOURCES if "/" in gv]
            return self._send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        gv = p.removeprefix("/api/").removeprefix("/apis/")
        if gv in RESOURCES:
            return self._send(200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": [
                {"name": plural, "singularName": kind.lower(), "namespaced": namespaced, "kind": kind,
                 "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]}
                for plural, kind, namespaced in RESOURCES[gv]]})
        if p in self.objects:
            return self._send(200, self.objects[p])
        if p == "/api/v1/nodes":  # the one list the chart looks up
            return self._send(200, {"kind": "NodeList", "apiVersion": "v1", "metadata": {},
                                    "items": [o for o in self.objects.values() if o["kind"] == "Node"]})
        return self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                                "message": f"{p} not found", "code": 404})


@contextmanager
def serving(objects: list[dict[str, Any]], tmp: Path) -> Iterator[Path]:
    """Serve ``objects``; yields a kubeconfig file pointing at them."""
    table = {_url(o["apiVersion"], next(pl for pl, k, _ in RESOURCES[o["apiVersion"]] if k == o["kind"]),
                  o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objects}
    handler = type("Handler", (_Handler,), {"objects": table})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    cfg = tmp / "kubeconfig"
    cfg.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "t", "cluster": {"server": f"http://127.0.0.1:{srv.server_address[1]}"}}],
        "users": [{"name": "t", "user": {"token": "t"}}],
        "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t", "namespace": "keyward"}}]}))
    cfg.chmod(0o600)
    try:
        yield cfg
    finally:
        srv.shutdown()
        srv.server_close()
