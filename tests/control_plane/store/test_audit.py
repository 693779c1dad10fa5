"""control_plane.store.audit: rows appended together form one valid chain, in one transaction;
a pooled connection left in autocommit still writes in one transaction under the write lock."""

from __future__ import annotations

import asyncio

from control_plane.store import WRITE_LOCK, Actor, AuditEntry, Store
from tests.control_plane.store.conftest import ADMIN, Db, new_id

ZEN = Actor("spiffe://keyward/zen-pool/public")


async def test_many_rows_in_one_transaction_continue_the_chain_in_their_order(store: Store, db: Db) -> None:
    org = new_id()
    await store.audit(ADMIN, "Before", org_id=org)
    entries = [AuditEntry(ZEN, "KeySent", org_id=org, key_id=f"k{i}", detail=f"n={i}") for i in range(40)]
    await store.audit_many(entries)
    await store.audit(ADMIN, "After", org_id=org)
    rows = db.sql(f"SELECT seq, action, key_id, xmin FROM audit_events WHERE org_id = '{org}' ORDER BY seq")
    got = [r.split("|") for r in rows.splitlines()]
    seqs = [int(r[0]) for r in got]
    assert seqs == list(range(seqs[0], seqs[0] + 42))  # gap-free, nothing of another writer between
    assert [r[1] for r in got] == ["Before"] + ["KeySent"] * 40 + ["After"]
    assert [r[2] for r in got[1:41]] == [f"k{i}" for i in range(40)]  # in the order given
    assert len({r[3] for r in got[1:41]}) == 1  # one transaction (one xmin) for the 40
    v = await store.verify_audit()
    assert v.ok, v.problem


async def test_concurrent_batches_and_single_rows_keep_one_chain(store: Store, db: Db) -> None:
    org = new_id()

    async def batch(i: int) -> None:
        await store.audit_many([AuditEntry(ZEN, "KeySent", org_id=org, key_id=f"b{i}-{j}") for j in range(5)])

    async def single(i: int) -> None:
        await store.audit(ADMIN, "Single", org_id=org, key_id=f"s{i}")

    await asyncio.gather(*(batch(i) for i in range(6)), *(single(i) for i in range(6)))
    assert db.sql(f"SELECT count(*) FROM audit_events WHERE org_id = '{org}'") == "36"
    v = await store.verify_audit()
    assert v.ok, v.problem


async def test_an_empty_batch_writes_nothing(store: Store, db: Db) -> None:
    before = db.sql("SELECT count(*) FROM audit_events")
    await store.audit_many([])
    assert db.sql("SELECT count(*) FROM audit_events") == before


async def test_a_connection_returned_in_autocommit_still_writes_in_one_locked_transaction(store: Store) -> None:
    """psycopg_pool's connection check can leave a connection in autocommit when the task asking
    for it is cancelled (at a set_autocommit that yields to the loop): the CA saw duplicate audit
    seqs under load. Here every pooled connection is put back in autocommit on purpose."""
    pool = store._rw
    async with pool.connection() as a, pool.connection() as b:  # the fixture's pool holds at most 2
        await a.set_autocommit(True)
        await b.set_autocommit(True)
    for _ in range(4):
        async with store._tx(write=True) as conn:
            assert not conn.autocommit
            cur = await conn.execute(
                "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
                " AND granted AND ((classid::bigint << 32) | objid::bigint) = %s", (WRITE_LOCK,))
            row = await cur.fetchone()
            assert row is not None and row["n"] == 1, "the write lock is not held through the transaction"
