"""The operator shell's rules that a review found breakable, with fakes for the CA and the API:
the registration sweep never deregisters a live pool, and a bypass switch that failed is not
recorded as done."""

from __future__ import annotations

import json
from typing import Any

import pytest

from k8s.operator import handlers as h
from k8s.operator import reconcile as rc
from k8s.operator.config import OperatorConfig
from k8s.operator.kube import Endpoint, Kube, KubeError
from k8s.operator.plan import PoolState


class FakeCA:
    def __init__(self, pools: list[str]) -> None:
        self.known = set(pools)
        self.deregistered: list[str] = []

    async def pools(self) -> dict[str, Any]:
        return {p: object() for p in self.known}

    async def deregister(self, name: str) -> None:
        self.deregistered.append(name)
        self.known.discard(name)


def state(kube: Any, ca: FakeCA) -> h.State:
    cfg = OperatorConfig(namespace="keyward")
    return h.State(cfg, kube, ca, rc.Release("keyward", "keyward", "z"))  # type: ignore[arg-type]


async def test_a_zenpool_list_the_api_cannot_serve_deregisters_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    kube = Kube(Endpoint("http://127.0.0.1:1"))

    async def not_found(*_: Any, **__: Any) -> None:
        return None  # what the API answers for a kind it does not serve (404)
    monkeypatch.setattr(kube, "_call", not_found)
    ca = FakeCA(["public", "bank"])
    with pytest.raises(KubeError):
        await h.sweep_registrations(state(kube, ca))
    assert ca.deregistered == []


class Pools:
    """ZenPools as the API serves them; ``late`` ones appear after the list (created meanwhile)."""

    def __init__(self, listed: list[str], late: list[str]) -> None:
        self.listed, self.late = listed, late

    async def list(self, p: str, selector: Any = None) -> list[dict[str, Any]]:
        return [{"metadata": {"name": n}} for n in self.listed]

    async def get(self, p: str) -> dict[str, Any] | None:
        name = p.rsplit("/", 1)[-1]
        return {"metadata": {"name": name}} if name in self.listed + self.late else None


async def test_the_sweep_deregisters_only_pools_gone_from_the_api() -> None:
    ca = FakeCA(["public", "new", "old"])
    gone = await h.sweep_registrations(state(Pools(["public"], late=["new"]), ca))
    assert gone == ["old"] and ca.deregistered == ["old"]


class Api:
    async def list(self, p: str, selector: Any = None) -> list[dict[str, Any]]:
        return []

    async def get(self, p: str) -> dict[str, Any] | None:
        return {"status": {"readyReplicas": 0, "replicas": 2}} if "deployments" in p else None

    async def event(self, *_: Any, **__: Any) -> None:
        return None


async def test_a_failed_bypass_switch_is_not_recorded_as_done(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = {"visibility": "public", "replicas": 2}
    status = {"applied": json.dumps(spec, sort_keys=True), "identity": "d", "bypass": False,
              "registered": {"visibility": "public", "organizations": []}, "servesFailClosedOrg": False}

    async def identity(*_: Any) -> str:
        return "d"

    async def service_patch_fails(*_: Any, **__: Any) -> None:
        raise KubeError(500, "etcdserver: request timed out")

    async def pools() -> dict[str, Any]:
        return {"p": PoolState("p", "public", (), False)}
    monkeypatch.setattr(h, "_identity", identity)
    monkeypatch.setattr(h, "_apply_service", service_patch_fails)
    st = state(Api(), FakeCA([]))  # no EndpointSlice: the CA has no ready endpoint; no ZEN is ready either
    monkeypatch.setattr(st, "ca_pools", pools)
    sp: dict[str, Any] = {}
    with pytest.raises(KubeError):
        await h.sync_pool(st, "p", {"metadata": {"name": "p"}, "spec": spec, "status": status}, sp, force=False)
    # reconcile_pool writes ``sp`` as the status whatever happened: the Service did not switch.
    assert sp.get("bypass") is False, sp
    assert "conditions" not in sp  # nor does a Bypass condition claim it did
