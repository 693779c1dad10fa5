"""k8s.operator.kube against the KMock API stand-in: the bearer token is re-read
on every call (the kubelet rotates it), label selectors hold, errors say what failed."""

from __future__ import annotations

from pathlib import Path

import pytest

from k8s.operator.kube import Endpoint, Kube, KubeError, path
from tests.k8s.kapi import NS, KeywardApi, install, requests

pytestmark = pytest.mark.kmock(cls=KeywardApi)


async def test_token_rotation_selectors_and_errors(kmock: KeywardApi, tmp_path: Path) -> None:
    install(kmock)
    token = tmp_path / "token"
    token.write_text("first\n")
    kube = Kube(Endpoint(server=str(kmock.url), token_path=str(token)))
    try:
        for name, pool in (("a", "x"), ("b", "y")):
            await kube.create(path("v1", "pods", NS), {"apiVersion": "v1", "kind": "Pod", "metadata": {
                "name": name, "namespace": NS, "labels": {"keyward.io/zen-pool": pool}}})
        token.write_text("second\n")  # the kubelet rotated it
        pods = await kube.list(path("v1", "pods", NS), {"keyward.io/zen-pool": "y"})
        assert [p["metadata"]["name"] for p in pods] == ["b"]
        auth = [r.headers.get("Authorization") for r in requests(kmock)]
        assert auth[0] == "Bearer first" and auth[-1] == "Bearer second"
        assert await kube.get(path("v1", "pods", NS, "missing")) is None
        with pytest.raises(KubeError) as e:
            await kube.create(path("v1", "pods", NS), {"metadata": {"name": "a", "namespace": NS}})
        assert e.value.status == 409 and f"POST /api/v1/namespaces/{NS}/pods" in str(e.value)
        assert await kube.delete(path("v1", "pods", NS, "a")) and not await kube.delete(path("v1", "pods", NS, "a"))
    finally:
        await kube.close()
