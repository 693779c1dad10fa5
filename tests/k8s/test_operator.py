"""The kopf operator run for real against the KMock API stand-in (see kapi.py)."""

from __future__ import annotations

import pytest

from tests.k8s.kapi import NS, KeywardApi, obj, until

pytestmark = pytest.mark.kmock(cls=KeywardApi)


def pool(name: str, **spec: object) -> dict[str, object]:
    return {"apiVersion": "keyward.io/v1alpha1", "kind": "ZenPool",
            "metadata": {"name": name, "namespace": NS, "generation": 1}, "spec": {"replicas": 2, **spec}}


async def test_smoke(api: KeywardApi, operator_factory) -> None:
    await operator_factory(ca_addr="127.0.0.1:1")
    await api.post(f"/apis/keyward.io/v1alpha1/namespaces/{NS}/zenpools", json=pool("public", visibility="public"))
    await until(lambda: obj(api, "apps/v1/deployments", "keyward-zen-public"), 20, "the pool's Deployment")
    print(dict(obj(api, "keyward.io/v1alpha1/zenpools", "public")))
