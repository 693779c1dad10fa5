"""The Kubernetes API stand-in for the operator tests: KMock's emulator.

No API server can run on this machine (no container engine), so the kopf
handlers run for real (kopf's event loop, watch streams, patches and
Events) against KMock, the mock server kopf's testing docs point to.
KMock stores objects and streams watch events; it runs no controllers.
So the tests play the controllers' part by hand, and say so where they do:
the scheduler (a pod's nodeName), the Deployment controller (readyReplicas),
the EndpointSlice controller (CA readiness).

``KeywardApi`` adds, thinly, the API-server behaviours kopf and the
operator rely on that KMock leaves out: ``metadata.resourceVersion``,
``uid`` and ``generation`` (kopf's JSON patches test the resourceVersion),
``metadata.generateName`` (kopf's Events use it), the ZenPool's scale
subresource answering with an autoscaling/v1 Scale (as the API server does
for a CRD with ``specReplicasPath: .spec.replicas``; KMock itself merges a
scale patch's ``spec.replicas`` into the object, which is that mapping), and
the Eviction subresource deleting the pod.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp.web
import jsonpatch
import kmock

NS = "keyward"

RESOURCES: dict[str, dict[str, Any]] = {
    "keyward.io/v1alpha1/zenpools": {"kind": "ZenPool", "singular": "zenpool", "shortnames": {"zp"},
                                     "subresources": {"status", "scale"}, "namespaced": True},
    "apps/v1/deployments": {"kind": "Deployment", "singular": "deployment", "subresources": {"status", "scale"},
                            "namespaced": True},
    "apps/v1/statefulsets": {"kind": "StatefulSet", "singular": "statefulset", "subresources": {"status", "scale"},
                             "namespaced": True},
    "v1/pods": {"kind": "Pod", "singular": "pod", "subresources": {"status", "eviction"}, "namespaced": True},
    "v1/nodes": {"kind": "Node", "singular": "node", "namespaced": False},
    "v1/services": {"kind": "Service", "singular": "service", "namespaced": True},
    "v1/secrets": {"kind": "Secret", "singular": "secret", "namespaced": True},
    "v1/configmaps": {"kind": "ConfigMap", "singular": "configmap", "namespaced": True},
    "v1/events": {"kind": "Event", "singular": "event", "namespaced": True},
    "v1/namespaces": {"kind": "Namespace", "singular": "namespace", "namespaced": False},
    "policy/v1/poddisruptionbudgets": {"kind": "PodDisruptionBudget", "singular": "poddisruptionbudget",
                                       "namespaced": True},
    "discovery.k8s.io/v1/endpointslices": {"kind": "EndpointSlice", "singular": "endpointslice", "namespaced": True},
}
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}


class KeywardApi(kmock.KubernetesEmulator):
    _rv = itertools.count(1000)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        rv = str(next(self._rv))
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:6]
            meta.update(resourceVersion=rv, uid=str(uuid.uuid4()), generation=1,
                        creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        elif request.action == kmock.action.UPDATE and request.resource is not None and request.name:
            key = (request.resource, request.namespace, request.name)
            cur = dict(self.objects[key]) if key in self.objects and not self.objects[key].deleted else {}
            gen = int((cur.get("metadata") or {}).get("generation") or 1)
            # generation moves only when the spec really changes (as in the API server)
            changed = request.subresource != "status" and _spec_after(cur, request.data) != cur.get("spec")
            if isinstance(request.data, dict):
                request.data.setdefault("metadata", {}).update(
                    resourceVersion=rv, **({"generation": gen + 1} if changed else {}))
            elif isinstance(request.data, list):  # JSON patch
                request.data.append({"op": "add", "path": "/metadata/resourceVersion", "value": rv})
                if changed:
                    request.data.append({"op": "add", "path": "/metadata/generation", "value": gen + 1})
        try:
            return await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed as e:  # the API server's answer to a stale resourceVersion
            return aiohttp.web.json_response({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                                              "reason": "Invalid", "code": 422, "message": str(e)}, status=422)


def _merge(a: Any, b: Any) -> Any:
    if not isinstance(b, dict):
        return b
    out = dict(a) if isinstance(a, dict) else {}
    for k, v in b.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge(out.get(k), v)
    return out


def _spec_after(obj: dict[str, Any], patch: Any) -> Any:
    """The object's spec once ``patch`` (a merge patch or a JSON patch) applies."""
    if isinstance(patch, dict):
        return _merge(copy.deepcopy(obj), patch).get("spec")
    if isinstance(patch, list):
        try:
            return jsonpatch.apply_patch(copy.deepcopy(obj), patch).get("spec")
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException):
            return obj.get("spec")
    return obj.get("spec")


def install(api: KeywardApi) -> None:
    for r, info in RESOURCES.items():
        api.resources[r] = {**info, "verbs": VERBS}

    def evict(req: kmock.Request) -> dict[str, Any]:
        key = (kmock.resource("v1/pods"), req.namespace, req.name)
        if key in api.objects and not api.objects[key].deleted:
            api.objects[key].delete()
        return {"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 201}

    api[kmock.resource("v1/pods"), kmock.subresource("eviction")] << evict

    def scale(req: kmock.Request) -> dict[str, Any]:
        o = api.objects[kmock.resource("keyward.io/v1alpha1/zenpools"), req.namespace, req.name]
        meta, st = o.get("metadata") or {}, o.get("status") or {}
        return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion") if k in meta},
                "spec": {"replicas": (o.get("spec") or {}).get("replicas", 0)},
                "status": {"replicas": st.get("replicas", 0), "selector": st.get("selector", "")}}

    api[kmock.resource("keyward.io/v1alpha1/zenpools"), kmock.subresource("scale")] << scale


def obj(api: KeywardApi, resource: str, name: str, ns: str | None = NS) -> Any:
    key = (kmock.resource(resource), ns, name)
    if key not in api.objects or api.objects[key].deleted:
        return None
    return api.objects[key]


def events(api: KeywardApi, reason: str) -> list[dict[str, Any]]:
    return [dict(o) for (r, _, _), o in list(api.objects.items())
            if r.plural == "events" and not o.deleted and o.get("reason") == reason]


async def until(pred: Callable[[], Any] | Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    """Poll ``pred`` until truthy; fail after ``timeout`` seconds naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.05)


def requests(api: KeywardApi) -> list[kmock.Request]:
    """Every request the stand-in has served so far (KMock's views iterate over them)."""
    return list(iter(api))
