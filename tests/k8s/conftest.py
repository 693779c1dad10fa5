"""Fixtures for the operator tests: the KMock API stand-in (see kapi.py), a
real kopf operator on it, and a real CA that trusts the PKI the operator issued."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import kopf
import pytest
import pytest_asyncio

from devstack.pg import PgCluster, free_port
from k8s.operator.config import OperatorConfig
from k8s.operator.handlers import register
from tests.helpers import CAProcess, start_ca
from tests.k8s.kapi import NS, KeywardApi, install, obj, until


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
    """The real kopf operator (event loop, watch streams, patches, Events) on the stand-in API."""

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
        waiter = asyncio.ensure_future(ready.wait())
        done, _ = await asyncio.wait([waiter, self.task], timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if self.task in done:
            self.task.result()
        assert ready.is_set(), "kopf did not become ready within 30 s"

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self.task, 30)

    def secret(self, name: str) -> dict[str, bytes]:
        s = obj(self.api, "v1/secrets", name)
        assert s is not None, f"Secret {name} not found"
        return {k: base64.b64decode(v) for k, v in s["data"].items()}


OperatorFactory = Callable[..., Awaitable[Operator]]


@pytest_asyncio.fixture
async def operator_factory(api: KeywardApi) -> AsyncIterator[OperatorFactory]:
    started: list[Operator] = []

    async def make(**overrides: Any) -> Operator:
        cfg = replace(OperatorConfig(kube_api=str(api.url), namespace=NS, interval=0.3, failover_after=2.0),
                      **overrides)
        op = Operator(api, cfg)
        await op.start()
        started.append(op)
        return op

    yield make
    for op in started:
        await op.close()


@dataclass
class OperatorCA:
    op: Operator
    ca: CAProcess | None
    pki: Path
    port: int
    pg: PgCluster
    master: Path
    workdir: Path
    db: str = ""

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start_ca(self) -> None:
        """A real CA, on its own database of the session's Postgres, with the
        server identity and trust anchor the operator issued."""
        if not self.db:  # a restart keeps its database
            self.db = f"op_{uuid.uuid4().hex[:10]}"
            await asyncio.to_thread(self.pg.psql, f"CREATE DATABASE {self.db} OWNER keyward", dbname="postgres")
        dsn = self.pg.dsn().replace("dbname=keyward", f"dbname={self.db}")
        self.ca = await asyncio.to_thread(start_ca, self.pg, self.pki, self.master, self.workdir / "ca",
                                          KEYWARD_DB_DSN=dsn, KEYWARD_CA_LISTEN=self.addr)

    def write_identity(self, secret: str, stem: str) -> None:
        s = self.op.secret(secret)
        for name, data, mode in ((f"{stem}.crt", s["tls.crt"], 0o644), (f"{stem}.key", s["tls.key"], 0o600),
                                 ("ca.crt", s["ca.crt"], 0o644)):
            p = self.pki / name
            p.write_bytes(data)
            os.chmod(p, mode)


@pytest_asyncio.fixture
async def operator_ca(api: KeywardApi, operator_factory: OperatorFactory, pg: PgCluster,
                      master_secret: tuple[bytes, Path], tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[OperatorCA]]]:
    """An operator whose CA address is reserved; ``start_ca()`` then starts a real CA (its own
    database on the session's Postgres) with the server identity the operator issued."""
    made: list[OperatorCA] = []

    async def make(*, start: bool = True) -> OperatorCA:
        port = free_port()
        op = await operator_factory(ca_addr=f"127.0.0.1:{port}")
        await until(lambda: obj(api, "v1/secrets", "keyward-ca-tls"), 10, "the CA's server identity Secret")
        pki = tmp_path / "pki"
        pki.mkdir(mode=0o700, exist_ok=True)
        oc = OperatorCA(op, None, pki, port, pg, master_secret[1], tmp_path)
        oc.write_identity("keyward-ca-tls", "server")
        oc.write_identity("keyward-admin-tls", "platform-admin")
        made.append(oc)
        if start:
            await oc.start_ca()
        return oc

    yield make
    for oc in made:
        if oc.ca is not None:
            oc.ca.stop()
