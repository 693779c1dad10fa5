"""A thin async client for the few Kubernetes API calls the operator makes
beyond kopf's own watching and patching (aiohttp, which kopf already uses).

Errors become :class:`KubeError` with the API's status and message, so a
handler can say what failed. Label selectors are sent to the server and
applied again here, so a list never returns objects outside the selector.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

Obj = dict[str, Any]
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MERGE = "application/merge-patch+json"


class KubeError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Kubernetes API {status}: {message}")
        self.status = status


@dataclass(frozen=True)
class Endpoint:
    server: str
    token_path: str | None = None
    """The ServiceAccount token file; read on every use: the kubelet rotates it (bound tokens, ~1 h)."""
    ca_path: str | None = None

    @property
    def token(self) -> str | None:
        return Path(self.token_path).read_text().strip() if self.token_path else None

    @classmethod
    def resolve(cls, kube_api: str) -> Endpoint:
        """``kube_api`` if given (tests, kubectl proxy), else in-cluster: the address the kubelet
        puts in KUBERNETES_SERVICE_HOST/PORT (as client-go's in-cluster config reads it), the
        ServiceAccount token and the cluster CA from the projected volume."""
        if kube_api:
            return cls(server=kube_api.rstrip("/"))
        host = os.environ.get("KUBERNETES_SERVICE_HOST", "kubernetes.default.svc")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if ":" in host:  # IPv6
            host = f"[{host}]"
        return cls(server=f"https://{host}:{port}", token_path=str(SA_DIR / "token"),
                   ca_path=str(SA_DIR / "ca.crt"))


def path(api: str, plural: str, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
    """``api`` is "v1" (core) or "group/version"."""
    base = "/api/v1" if api == "v1" else f"/apis/{api}"
    p = f"{base}/namespaces/{namespace}/{plural}" if namespace else f"{base}/{plural}"
    if name:
        p += f"/{quote(name)}"
    if sub:
        p += f"/{sub}"
    return p


def matches(obj: Obj, selector: dict[str, str]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def selector_string(selector: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


class Kube:
    def __init__(self, endpoint: Endpoint, timeout: float = 10.0) -> None:
        self.endpoint = endpoint
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def _s(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            ctx: ssl.SSLContext | bool = False
            if self.endpoint.ca_path:
                ctx = ssl.create_default_context(cafile=self.endpoint.ca_path)
            self._session = aiohttp.ClientSession(
                base_url=self.endpoint.server, timeout=self._timeout,
                connector=aiohttp.TCPConnector(ssl=ctx) if self.endpoint.ca_path else None)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _call(self, method: str, p: str, *, body: Any = None, ctype: str = "application/json",
                    params: dict[str, str] | None = None) -> Obj | None:
        s = await self._s()
        headers: dict[str, str] = {}
        token = self.endpoint.token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        kw: dict[str, Any] = {"params": params or {}, "headers": headers}
        if body is not None:
            kw["json"] = body
            headers["Content-Type"] = ctype
        async with s.request(method, p, **kw) as r:
            if r.status == 404:
                return None
            try:
                data = await r.json(content_type=None)
            except ValueError:
                data = {"message": (await r.text())[:300]}
            if r.status >= 400:
                msg = data.get("message", "") if isinstance(data, dict) else str(data)[:300]
                raise KubeError(r.status, f"{method} {p}: {msg}")
            return data if isinstance(data, dict) else {}

    async def get(self, p: str) -> Obj | None:
        return await self._call("GET", p)

    async def list(self, p: str, selector: dict[str, str] | None = None) -> list[Obj]:
        """A 404 is an error here, never an empty list: a kind the server does not serve (a CRD not
        yet synced after a restart) must not read as "there are none" (the registration sweep would
        deregister every pool)."""
        params = {"labelSelector": selector_string(selector)} if selector else None
        data = await self._call("GET", p, params=params)
        if data is None:
            raise KubeError(404, f"GET {p}: the server does not serve this kind (yet)")
        items: list[Obj] = data.get("items") or []
        return [i for i in items if matches(i, selector or {})]

    async def create(self, p: str, body: Obj) -> Obj:
        out = await self._call("POST", p, body=body)
        if out is None:
            raise KubeError(404, f"POST {p}: not found")
        return out

    async def replace(self, p: str, body: Obj) -> Obj:
        """PUT: fails with 409 when ``body``'s resourceVersion is stale (optimistic concurrency)."""
        out = await self._call("PUT", p, body=body)
        if out is None:
            raise KubeError(404, f"PUT {p}: not found")
        return out

    async def patch(self, p: str, body: Obj) -> Obj | None:
        return await self._call("PATCH", p, body=body, ctype=MERGE)

    async def delete(self, p: str, grace_seconds: int | None = None) -> bool:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": grace_seconds} \
            if grace_seconds is not None else None
        return await self._call("DELETE", p, body=body) is not None

    async def apply(self, api: str, plural: str, obj: Obj) -> Obj:
        """Create ``obj``, or merge-patch it over the existing one."""
        meta = obj["metadata"]
        one = path(api, plural, meta.get("namespace"), meta["name"])
        if await self.get(one) is None:
            try:
                return await self.create(path(api, plural, meta.get("namespace")), obj)
            except KubeError as e:
                if e.status != 409:
                    raise
        out = await self.patch(one, obj)
        if out is None:
            raise KubeError(404, f"PATCH {one}: vanished while applying")
        return out

    async def event(self, obj: Obj, *, type: str, reason: str, message: str) -> None:
        """Post a core/v1 Event about ``obj`` (for code outside kopf's handlers, where kopf.event
        has no queue). A failure to post is not the caller's failure."""
        meta = obj.get("metadata") or {}
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        ev = {"apiVersion": "v1", "kind": "Event",
              "metadata": {"generateName": f"{meta.get('name', 'keyward')}.", "namespace": meta.get("namespace")},
              "involvedObject": {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "name": meta.get("name"),
                                 "namespace": meta.get("namespace"), "uid": meta.get("uid")},
              "type": type, "reason": reason, "message": message[:1024], "firstTimestamp": now, "lastTimestamp": now,
              "count": 1, "source": {"component": "keyward-operator"}, "reportingComponent": "keyward-operator"}
        try:
            await self.create(path("v1", "events", meta.get("namespace")), ev)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - an Event lost must not cut a reconciliation short
            pass
