"""Fixtures for the operator tests: the KMock API stand-in and a real kopf operator on it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import replace

import kopf
import pytest
import pytest_asyncio

from k8s.operator.config import OperatorConfig
from k8s.operator.handlers import register
from tests.k8s.kapi import NS, KeywardApi, install

pytestmark = pytest.mark.kmock(cls=KeywardApi)


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


@pytest.fixture
def api(kmock: KeywardApi) -> KeywardApi:
    install(kmock)
    # What `helm install` leaves behind for the operator: the passwords Secret.
    kmock.objects["v1/secrets", NS, "keyward-secrets"] = {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "keyward-secrets", "namespace": NS},
        "data": {"master-secret": b64("m" * 64), "postgres-password": b64("pg-pw"),
                 "replication-password": b64("repl-pw"), "keyward-password": b64("kw-pw")}}
    return kmock


class Operator:
    def __init__(self, api: KeywardApi, cfg: OperatorConfig) -> None:
        self.api, self.cfg = api, cfg
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        registry = kopf.OperatorRegistry()
        register(registry, self.cfg)
        ready = asyncio.Event()
        self.task = asyncio.create_task(kopf.operator(
            registry=registry, standalone=True, clusterwide=True,
            stop_flag=self.stop, ready_flag=ready, memo=kopf.Memo()))
        done, _ = await asyncio.wait([asyncio.ensure_future(ready.wait()), self.task], timeout=30,
                                     return_when=asyncio.FIRST_COMPLETED)
        if self.task in done:
            self.task.result()
        assert ready.is_set(), "kopf did not become ready within 30 s"

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self.task, 30)


@pytest_asyncio.fixture
async def operator_factory(api: KeywardApi) -> AsyncIterator[object]:
    started: list[Operator] = []

    async def make(**overrides: object) -> Operator:
        cfg = replace(OperatorConfig(kube_api=str(api.url), namespace=NS, interval=0.3, failover_after=2.0),
                      **overrides)  # type: ignore[arg-type]
        op = Operator(api, cfg)
        await op.start()
        started.append(op)
        return op

    logging.getLogger("kopf").setLevel(logging.INFO)
    yield make
    for op in started:
        await op.close()
