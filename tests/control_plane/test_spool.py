"""control_plane.spool: KeySent rows of concurrent calls share a transaction; each call returns
after its row committed, or after its line is in the spool file, or not at all (no spool).

Against a stand-in store (only ``audit_many``): no server. Nothing here asserts a duration.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, cast

import pytest

from control_plane import spool
from control_plane.deadline import CALL_DEADLINE
from control_plane.errors import InvalidArgument, Unavailable
from control_plane.spool import KeySentAuditor
from control_plane.store import Actor, AuditEntry, Store

ZEN = Actor("spiffe://keyward/zen-pool/public")


class FakeStore:
    def __init__(self) -> None:
        self.committed: list[list[AuditEntry]] = []
        self.deadlines: list[float | None] = []
        self.fail: Exception | None = None
        self.hang = False
        self.bounds: list[float] = []

    async def bounded(self, aw: Coroutine[Any, Any, None], seconds: float) -> None:
        self.bounds.append(seconds)
        await asyncio.wait_for(aw, max(0.0, seconds))

    async def audit_many(self, entries: Sequence[AuditEntry]) -> None:
        self.deadlines.append(CALL_DEADLINE.get())
        for _ in range(3):
            await asyncio.sleep(0)  # a transaction's round trips
        if self.hang:
            await asyncio.Event().wait()
        if self.fail is not None:
            raise self.fail
        self.committed.append(list(entries))


def auditor(store: FakeStore, path: str) -> KeySentAuditor:
    return KeySentAuditor(cast(Store, store), path)


def spooled(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


async def test_concurrent_calls_share_transactions_and_return_after_theirs(tmp_path: Path) -> None:
    store = FakeStore()
    a = auditor(store, str(tmp_path / "spool"))

    def written(key: str) -> bool:
        return any(e.key_id == key for batch in store.committed for e in batch)

    async def call(i: int) -> None:
        await a.key_sent(ZEN, "acme", f"k{i}", f"pool=public version={i}")
        assert written(f"k{i}"), "key_sent returned before its row was committed"

    await asyncio.gather(*(call(i) for i in range(200)))
    rows = [e for batch in store.committed for e in batch]
    assert sorted(e.key_id for e in rows) == sorted(f"k{i}" for i in range(200))
    assert all(e.action == "KeySent" and e.actor == ZEN and e.org_id == "acme" for e in rows)
    assert len(store.committed) < 20, [len(b) for b in store.committed]  # far fewer commits than calls
    assert not spooled(tmp_path / "spool")


async def test_a_batch_without_a_database_goes_to_the_spool_whole(tmp_path: Path) -> None:
    store = FakeStore()
    store.fail = Unavailable("database unavailable: no server could be reached; retry later")
    path = tmp_path / "spool"
    a = auditor(store, str(path))
    await asyncio.gather(*(a.key_sent(ZEN, "acme", f"k{i}", "d") for i in range(30)))
    assert sorted(x["key_id"] for x in spooled(path)) == sorted(f"k{i}" for i in range(30))
    assert a._spool.stats.batches < 30  # lines of concurrent calls share an fsync

    # A primary is back: the spool is written back in transactions of REPLAY_BATCH rows.
    store.fail = None
    assert await a.flush() == 30
    assert [len(b) for b in store.committed] == [30]
    assert all(e.detail.startswith("d (spooled at ") for e in store.committed[0])
    assert spooled(path) == []


async def test_without_a_spool_a_failed_batch_fails_all_its_calls(tmp_path: Path) -> None:
    store = FakeStore()
    store.fail = Unavailable("database unavailable")
    a = auditor(store, "")
    results = await asyncio.gather(*(a.key_sent(ZEN, "acme", f"k{i}", "d") for i in range(10)),
                                   return_exceptions=True)
    assert all(isinstance(r, Unavailable) and "key is not sent" in str(r) for r in results), results


async def test_an_error_that_is_no_outage_reaches_every_caller_of_the_batch(tmp_path: Path) -> None:
    store = FakeStore()
    store.fail = InvalidArgument("refused")
    path = tmp_path / "spool"
    a = auditor(store, str(path))
    results = await asyncio.gather(*(a.key_sent(ZEN, "acme", f"k{i}", "d") for i in range(5)),
                                   return_exceptions=True)
    assert all(isinstance(r, InvalidArgument) for r in results) and not spooled(path)


async def test_a_row_not_committed_in_time_is_spooled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool, "DIRECT_TIMEOUT", 0.05)
    store = FakeStore()
    store.hang = True  # a frozen primary
    path = tmp_path / "spool"
    a = auditor(store, str(path))
    await asyncio.gather(*(a.key_sent(ZEN, "acme", f"k{i}", "d") for i in range(5)))
    assert sorted(x["key_id"] for x in spooled(path)) == [f"k{i}" for i in range(5)]
    await a.aclose()


async def test_a_batch_is_bounded_by_its_most_patient_caller_not_by_the_first(tmp_path: Path) -> None:
    store = FakeStore()
    a = auditor(store, "")  # no spool: a caller waits until its call's deadline
    now = time.monotonic()

    async def call(i: int, deadline: float) -> None:
        CALL_DEADLINE.set(deadline)
        await a.key_sent(ZEN, "acme", f"k{i}", "d")

    await asyncio.gather(call(0, now + 10), call(1, now + 20), call(2, now + 5))
    assert [len(b) for b in store.committed] == [3]  # one batch
    # Its latest caller waits until REPLY_MARGIN before its deadline; the store keeps TX_RESERVE
    # of the batch's deadline back: the transaction ends when that caller stops waiting.
    until = now + 20 - spool.REPLY_MARGIN
    assert store.deadlines == [pytest.approx(until + spool.TX_RESERVE)]
    assert store.bounds[0] == pytest.approx(until + spool.TX_RESERVE - now, abs=0.5)  # then abandoned


async def test_a_torn_spool_line_is_set_aside_and_the_others_are_written(tmp_path: Path) -> None:
    """A line torn by a crash or a full disk mid-write stopped the flusher for good (json.loads
    raised in its loop, which caught only database errors): no spooled event reached the audit
    log again. Found in review (helper-19's notes)."""
    store = FakeStore()
    path = tmp_path / "spool.jsonl"
    good = {"actor": ZEN.spiffe_id, "org_id": "acme", "key_id": "k1", "detail": "pool=public version=1",
            "at": "2026-11-30T10:00:00+00:00"}
    path.write_text(json.dumps(good) + "\n" + '{"actor": "spiffe://keyward/zen-pool/pub' + "\n"
                    + json.dumps({**good, "key_id": "k2"}) + "\n")
    a = auditor(store, str(path))
    try:
        assert await a.flush() == 3
    finally:
        await a.aclose()
    assert [e.key_id for batch in store.committed for e in batch] == ["k1", "k2"]
    assert spooled(path) == []
    assert (tmp_path / "spool.jsonl.malformed").read_text() == '{"actor": "spiffe://keyward/zen-pool/pub\n'
