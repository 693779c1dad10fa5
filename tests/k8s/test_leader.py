"""Leader election's decision (k8s/operator/leader.py), as a table: client-go's rules."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp

from k8s.operator.kube import KubeError
from k8s.operator.leader import Elector, Observed, Timing, decide, record

T = Timing(lease_seconds=15)


def lease(holder: str, renew: str = "t1", transitions: int = 0) -> dict[str, Any]:
    return {"spec": {"holderIdentity": holder, "renewTime": renew, "leaseTransitions": transitions}}


def test_decisions() -> None:
    assert decide(None, "a", None, 0, T) == "create"
    assert decide(lease("a"), "a", None, 0, T) == "renew"
    assert decide(lease(""), "a", None, 0, T) == "acquire"  # released by its holder
    # Another holder: never taken on a first look, nor while its renewals move.
    assert decide(lease("b"), "a", None, 100, T) == "wait"
    seen = Observed(record(lease("b", "t1")), at=100)
    assert decide(lease("b", "t2"), "a", seen, 200, T) == "wait"
    # Unchanged for a whole lease duration on *our* clock (skew between nodes cannot matter).
    assert decide(lease("b", "t1"), "a", seen, 114.9, T) == "wait"
    assert decide(lease("b", "t1"), "a", seen, 115, T) == "acquire"


class FakeLeases:
    """The Lease API as the API server serves it: resourceVersion checks (409 on a stale write)."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.rv = 0
        self.fail: list[BaseException] = []  # raised, one per call, before anything else
        self.hang = False

    async def _enter(self) -> None:
        if self.hang:
            await asyncio.sleep(3600)
        if self.fail:
            raise self.fail.pop(0)

    async def get(self, p: str) -> dict[str, Any] | None:
        await self._enter()
        return json.loads(json.dumps(self.lease)) if self.lease else None

    async def create(self, p: str, body: dict[str, Any]) -> dict[str, Any]:
        await self._enter()
        if self.lease is not None:
            raise KubeError(409, "exists")
        self.rv += 1
        self.lease = {**body, "metadata": {**body["metadata"], "resourceVersion": str(self.rv)}}
        return self.lease

    async def replace(self, p: str, body: dict[str, Any]) -> dict[str, Any]:
        await self._enter()
        assert self.lease is not None
        if body["metadata"].get("resourceVersion") != self.lease["metadata"]["resourceVersion"]:
            raise KubeError(409, "stale")
        self.rv += 1
        self.lease = {**body, "metadata": {**body["metadata"], "resourceVersion": str(self.rv)}}
        return self.lease


FAST = Timing(lease_seconds=1.5, renew_deadline=1.0, retry=0.1)


def elector(api: FakeLeases, me: str) -> Elector:
    return Elector(api, "ns", "op", me, FAST)  # type: ignore[arg-type]  # the Lease calls Elector makes


async def test_unexpected_errors_never_make_a_leader() -> None:
    api = FakeLeases()
    api.fail = [aiohttp.ServerDisconnectedError(), RuntimeError("anything"), TimeoutError()]
    e = elector(api, "a")
    await asyncio.wait_for(e.acquire(), 5)
    assert not api.fail and record(api.lease)[0] == "a"


async def test_two_replicas_one_leader_and_takeover_after_expiry() -> None:
    api = FakeLeases()
    a, b = elector(api, "a"), elector(api, "b")
    await a.acquire()
    assert not await b.try_once()  # a holds it
    holding = asyncio.create_task(a.hold())
    await asyncio.sleep(FAST.lease_seconds * 2)  # a keeps renewing: b never takes over
    assert not await b.try_once() and record(api.lease)[0] == "a"
    holding.cancel()  # a dies without a word
    t0 = time.monotonic()
    await asyncio.wait_for(b.acquire(), 10)
    assert record(api.lease)[0] == "b" and time.monotonic() - t0 >= FAST.lease_seconds - FAST.retry
    assert record(api.lease)[2] == 1  # one transition


async def test_a_leader_steps_down_before_the_lease_can_expire() -> None:
    api = FakeLeases()
    e = elector(api, "a")
    await e.acquire()
    api.fail = [OSError("refused")] * 3
    api.hang = False
    holding = asyncio.create_task(e.hold())
    await asyncio.sleep(0.5)
    api.hang = True  # then a request hangs for good (the API server partitioned away)
    await asyncio.wait_for(holding, 5)
    # Returned within the renew deadline of its last renewal: before anyone else may take the Lease.
    assert time.monotonic() - e.renewed_at < FAST.lease_seconds


async def test_a_stopping_leader_releases_the_lease() -> None:
    api = FakeLeases()
    a, b = elector(api, "a"), elector(api, "b")
    await a.acquire()
    await a.release()
    assert record(api.lease)[0] == ""
    assert await b.try_once()  # at once, no expiry to wait for
