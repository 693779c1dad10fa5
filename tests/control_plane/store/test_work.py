"""control_plane.store.work: every admin write is one unit of work, in one order.

Observed in the database itself: triggers note, in commit order, each row the
writes touch; a write's own mutation comes first, then its request_log row,
its events, its audit row. A replay adds nothing; a refused write leaves nothing.
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from control_plane.certs import CertInfo, KeyAlgorithm
from control_plane.custody import PendingKey
from control_plane.errors import Aborted, InvalidArgument
from control_plane.policy import Policy
from control_plane.store import RequestKey, Store
from tests.control_plane.store.conftest import ADMIN, Db, new_id

NOTED = ("organizations", "zen_pools", "intermediate_keys", "request_log", "key_events", "audit_events")


@pytest.fixture
def noted(db: Db) -> Iterator[Callable[[], list[str]]]:
    """Every insert or update of a noted table, in order; returns what reads (and clears) the notes."""
    db.sql("CREATE TABLE IF NOT EXISTS test_notes (n bigserial PRIMARY KEY, what text NOT NULL);"
           "CREATE OR REPLACE FUNCTION test_note() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $f$"
           " BEGIN INSERT INTO test_notes (what) VALUES (TG_TABLE_NAME"
           " || coalesce(':' || (to_jsonb(NEW)->>'kind'), '')); RETURN NEW; END $f$;"
           + "".join(f"CREATE TRIGGER test_note AFTER INSERT OR UPDATE ON {t} FOR EACH ROW"
                     " EXECUTE FUNCTION test_note();" for t in NOTED))

    def read() -> list[str]:
        out = db.sql("DELETE FROM test_notes RETURNING n, what").splitlines()
        return [w for _, w in sorted((int(n), w) for n, w in (line.split("|") for line in out))]

    try:
        yield read
    finally:
        db.sql("".join(f"DROP TRIGGER IF EXISTS test_note ON {t};" for t in NOTED))


def rid(action: str = "x") -> RequestKey:
    return RequestKey(f"rq-{uuid.uuid4().hex}", f"params-of-{action}")


def pending_key(org_id: str) -> PendingKey:
    return PendingKey(key_id=str(uuid.uuid4()), org_id=org_id, algorithm=KeyAlgorithm.EC_P256,
                      sealed=os.urandom(64), keylib_format="test", spki_sha256=os.urandom(32), csr_pem="CSR")


def accept(fp: bytes) -> tuple[CertInfo, str, str]:
    now = dt.datetime.now(dt.UTC)
    return CertInfo("CN=test", uuid.uuid4().hex, now, now + dt.timedelta(days=30), fp), "CERT", ""


async def test_a_write_mutates_then_remembers_then_emits_then_audits(store: Store, noted: Any) -> None:
    await store.register_pool(ADMIN, new_id("p"), "public", [])  # the org below loses it when made private
    org = new_id()
    noted()
    r = rid()
    await store.create_org(ADMIN, org, org, Policy(), r)
    assert noted() == ["organizations", "request_log", "key_events:policy_changed", "audit_events"]
    await store.update_policy(ADMIN, org, Policy(private_zen_only=True), 1, rid())
    assert noted() == ["organizations", "request_log", "key_events:access_revoked", "key_events:policy_changed",
                       "audit_events"]
    pk = pending_key(org)
    assert (await store.add_pending_key(ADMIN, pk, rid()))["key_id"] == pk.key_id
    assert noted() == ["intermediate_keys", "request_log", "audit_events"]
    await store.activate(ADMIN, org, accept, rid())
    assert noted() == ["organizations", "intermediate_keys", "request_log", "key_events:rotated", "audit_events"]
    await store.revoke(ADMIN, org, pk.key_id, "test", rid())
    assert noted() == ["request_log", "key_events:revoked", "audit_events"]
    pool = new_id("p")
    await store.register_pool(ADMIN, pool, "private", [org], rid())
    assert noted() == ["zen_pools", "request_log", "audit_events"]
    await store.deregister_pool(ADMIN, pool, rid())
    assert noted() == ["request_log", "key_events:access_revoked", "audit_events"]
    # Without a request id: the same order, nothing remembered.
    await store.update_policy(ADMIN, org, Policy(), 0)
    assert noted() == ["organizations", "key_events:policy_changed", "audit_events"]


async def test_a_replay_answers_the_first_result_and_writes_nothing(store: Store, noted: Any) -> None:
    org, pool = new_id(), new_id("p")
    first: dict[str, Any] = {}
    calls: dict[str, Callable[[RequestKey], Awaitable[Any]]] = {
        "create": lambda r: store.create_org(ADMIN, org, org, Policy(), r),
        "policy": lambda r: store.update_policy(ADMIN, org, Policy(blocked_hosts=("a.test",)), 0, r),
        "csr": lambda r: store.add_pending_key(ADMIN, pending_key(org), r),
        "activate": lambda r: store.activate(ADMIN, org, accept, r),
        "revoke": lambda r: store.revoke(ADMIN, org, first["activate"].key_id, "test", r),
        "register": lambda r: store.register_pool(ADMIN, pool, "private", [org], r),
        "deregister": lambda r: store.deregister_pool(ADMIN, pool, r),
    }
    keys = {name: rid(name) for name in calls}
    for name, call in calls.items():
        first[name] = await call(keys[name])
    noted()
    for name, call in calls.items():
        again = await call(keys[name])
        assert noted() == [], f"a replay of {name} wrote"
        if name == "csr":
            assert again == first[name]  # the stored result, not the new pending key offered
        elif name in ("register", "deregister"):
            assert (again.name, again.visibility, again.org_ids) == (pool, "private", (org,))
        elif name in ("activate", "revoke"):
            assert again.key_id == first["activate"].key_id and again.state == "revoked"
        else:
            assert again.org_id == org


async def test_a_refused_write_leaves_nothing(store: Store, noted: Any) -> None:
    org = new_id()
    await store.create_org(ADMIN, org, org, Policy())
    noted()
    r = rid()
    with pytest.raises(Aborted):
        await store.update_policy(ADMIN, org, Policy(), 7, r)  # not at version 7
    assert noted() == []
    # Nothing was remembered: the same request id applies once the call is right.
    assert (await store.update_policy(ADMIN, org, Policy(), 1, r)).policy_version == 2


async def test_a_request_id_of_another_call_is_refused_by_every_write(store: Store) -> None:
    """A request id already used (here by CreateOrganization) names that call's result: reused for
    another call it is refused as such, INVALID_ARGUMENT. Registering a new pool and deregistering an
    existing one once answered ALREADY_EXISTS "the object exists already" instead (their replay was
    looked up only when the pool existed, resp. did not)."""
    org, other, pool = new_id(), new_id(), new_id("p")
    used = rid("create")
    await store.create_org(ADMIN, org, org, Policy(), used)
    await store.register_pool(ADMIN, pool, "private", [org])
    reused = RequestKey(used.id, "other parameters")  # as the service's digest of another request
    writes: dict[str, Callable[[], Awaitable[Any]]] = {
        "create": lambda: store.create_org(ADMIN, other, other, Policy(), reused),
        "policy": lambda: store.update_policy(ADMIN, org, Policy(), 0, reused),
        "csr": lambda: store.add_pending_key(ADMIN, pending_key(org), reused),
        "activate": lambda: store.activate(ADMIN, org, accept, reused),
        "revoke": lambda: store.revoke(ADMIN, org, str(uuid.uuid4()), "", reused),
        "register a new pool": lambda: store.register_pool(ADMIN, new_id("p"), "public", [], reused),
        "register an existing pool": lambda: store.register_pool(ADMIN, pool, "public", [], reused),
        "deregister": lambda: store.deregister_pool(ADMIN, pool, reused),
    }
    wrong = {}
    for name, call in writes.items():
        try:
            await call()
            wrong[name] = "applied"
        except InvalidArgument as e:
            assert "already used" in str(e)
        except Exception as e:
            wrong[name] = f"{type(e).__name__}: {e}"
    assert not wrong, wrong


async def test_a_pool_registration_retried_after_its_deregistration_is_a_replay(store: Store) -> None:
    """Retries of a committed write answer with its result, whatever happened since: they never
    apply it again, and never fail with ALREADY_EXISTS (as both of these once did)."""
    org, pool = new_id(), new_id("p")
    await store.create_org(ADMIN, org, org, Policy())
    reg, dereg = rid("register"), rid("deregister")
    await store.register_pool(ADMIN, pool, "private", [org], reg)
    await store.deregister_pool(ADMIN, pool, dereg)
    again = await store.register_pool(ADMIN, pool, "private", [org], reg)
    assert (again.name, again.visibility, again.org_ids) == (pool, "private", (org,))
    assert await store.get_pool(pool) is None  # not registered again

    await store.register_pool(ADMIN, pool, "public", [])  # registered anew, by another request
    gone = await store.deregister_pool(ADMIN, pool, dereg)
    assert (gone.name, gone.visibility, gone.org_ids) == (pool, "private", (org,))
    now = await store.get_pool(pool)
    assert now is not None and now.visibility == "public"  # not deregistered again
