"""data_plane.workers and data_plane.worker: KEYWARD_ZEN_WORKERS > 1.

A Supervisor (what ``python -m data_plane`` becomes with workers) over local orgs and a real
signer process, two real worker processes (``python -m data_plane.worker``) sharing its
listening socket, a local TLS origin: every worker serves; the org key is in the signer process
only, never in a worker; a policy change reaches every worker before its next decision; a
rotated-out key signs nothing more; a dead worker is started again."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import ssl
from collections.abc import Awaitable, Callable, Iterator

import pytest

from data_plane.signer import LeafRequest
from data_plane.worker import RemoteKeys
from data_plane.workers import Channel, Supervisor, WatchedPolicies
from tests.data_plane.test_origins import Keys, Origin, Pki, _until, connect, fetch, pki  # noqa: F401 (fixture)
from tests.data_plane.test_signer import _scan_process


@pytest.fixture
def worker_env(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:  # noqa: F811
    """What a worker reads from the environment (the CA's settings: unused by workers)."""
    for k in ("KEYWARD_ZEN_TLS_CERT_FILE", "KEYWARD_ZEN_TLS_KEY_FILE", "KEYWARD_ZEN_CA_TRUST_FILE",
              "KEYWARD_MASTER_SECRET_FILE"):
        monkeypatch.setenv(k, "-")
    monkeypatch.setenv("KEYWARD_ZEN_EXTRA_ROOTS_FILE", str(pki.web_root))
    monkeypatch.setenv("KEYWARD_ZEN_RESOLVE", "a.test=127.0.0.1,b.test=127.0.0.1")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    yield


Test = Callable[[Supervisor, Keys, int, Origin, ssl.SSLContext], Awaitable[None]]


def run(pki: Pki, test: Test, workers: int = 2) -> None:  # noqa: F811
    async def main() -> None:
        origin = Origin()
        await origin.start(pki)
        keys = Keys(pki, ["org-a", "org-b"])
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0, start_serving=False)
        sup = Supervisor(keys, workers, [s.fileno() for s in server.sockets], [])
        await sup.start()
        trust = ssl.create_default_context(cafile=str(pki.org_root))
        try:
            await test(sup, keys, server.sockets[0].getsockname()[1], origin, trust)
        finally:
            await sup.stop()
            server.close()
            await origin.stop()
    asyncio.run(main())


def _pids(sup: Supervisor) -> set[int]:
    return {p.pid for p in sup.procs.values() if p.poll() is None}


def test_workers_serve_and_the_key_stays_in_its_signer(pki: Pki, worker_env: None) -> None:  # noqa: F811
    async def test(sup: Supervisor, keys: Keys, port: int, origin: Origin, trust: ssl.SSLContext) -> None:
        for i in range(8):  # new connections, each to another name: a leaf minted (signed) for each
            sni = f"{'ab'[i % 2]}.test"
            assert (await fetch(port, "org-a", "a.test", origin.port, sni, trust)).endswith(sni.encode())
        assert sup.health() == {"configured": 2, "running": 2}
        # The workers minted through the supervisor's signer; the key is there, and in no worker.
        assert _scan_process(pki.signer.pid, pki.secret), "the signer holds the key"
        for pid in _pids(sup):
            assert _scan_process(pid, pki.secret) == [], f"worker {pid} holds the org key"
    run(pki, test)


def test_a_policy_change_reaches_every_worker(pki: Pki, worker_env: None) -> None:  # noqa: F811
    async def test(sup: Supervisor, keys: Keys, port: int, origin: Origin, trust: ssl.SSLContext) -> None:
        assert await fetch(port, "org-a", "a.test", origin.port, "a.test", trust)
        keys.policies["org-a"] = dataclasses.replace(keys.policies["org-a"], blocked_hosts=("a.test",))
        await asyncio.sleep(0.2)  # the push is one write to each worker's channel
        for _ in range(6):  # whichever worker accepts, it decides on the new policy
            head, _r, w = await connect(port, "org-a", "a.test", origin.port)
            assert head.startswith(b"HTTP/1.1 403"), head
            w.close()
        # Another org's policy is its own.
        assert await fetch(port, "org-b", "a.test", origin.port, "a.test", trust)
    run(pki, test)


def test_a_rotated_out_key_signs_nothing_and_a_dead_worker_comes_back(pki: Pki, worker_env: None) -> None:  # noqa: F811
    async def test(sup: Supervisor, keys: Keys, port: int, origin: Origin, trust: ssl.SSLContext) -> None:
        import datetime as dt

        now = dt.datetime.now(dt.UTC)
        req = LeafRequest("x.test", ("x.test",), (), b"", now, now, 1)
        with pytest.raises(LookupError):
            await sup._handle("sign", ("org-a", "an-older-key", req))
        with pytest.raises(LookupError):
            await sup._handle("sign", ("org-c", "k1", req))  # an org it holds no key of
        before = _pids(sup)
        os.kill(next(iter(before)), signal.SIGKILL)
        await _until(lambda: len(_pids(sup) - before) == 1 and len(_pids(sup)) == 2)
        await asyncio.sleep(0.5)  # the new one is serving
        for _ in range(4):
            assert await fetch(port, "org-a", "a.test", origin.port, "a.test", trust)
    run(pki, test)


def test_the_channel_and_what_a_worker_is_told() -> None:
    async def main() -> None:
        import socket

        a, b = socket.socketpair()
        ra, wa = await asyncio.open_unix_connection(sock=a)
        rb, wb = await asyncio.open_unix_connection(sock=b)
        keys = RemoteKeys()
        gone: list[str] = []
        keys.on_key_gone.append(gone.append)

        async def answer(kind: str, args: tuple[object, ...]) -> object:
            if kind == "boom":
                raise ValueError("no")
            return (kind, args)
        sup_side = Channel(ra, wa, answer)
        keys.ch = Channel(rb, wb, on_push=keys.on_push)
        tasks = [asyncio.create_task(sup_side.run()), asyncio.create_task(keys.ch.run())]
        assert await keys.ch.call("echo", 1, "x") == ("echo", (1, "x"))
        with pytest.raises(RuntimeError, match="ValueError: no"):
            await keys.ch.call("boom")
        watched = WatchedPolicies({}, lambda org, p: sup_side.push("policy", org, p))
        sup_side.push("hello", {}, ["zen:8080"])
        watched["o"] = "P1"
        watched.setdefault("o", "P2")  # there already: no change
        watched.setdefault("n", "N1")
        watched.pop("o")
        sup_side.push("gone", "n")
        await asyncio.sleep(0.1)
        assert keys.policies == {"n": "N1"} and keys.pac == ["zen:8080"] and gone == ["n"]
        wa.close()
        await asyncio.sleep(0.1)
        with pytest.raises(ConnectionError):
            await keys.ch.call("echo")
        for t in tasks:
            t.cancel()
    asyncio.run(main())
