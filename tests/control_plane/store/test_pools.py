"""control_plane.store.pools: one rule for which orgs a pool serves, in Python and in SQL.

``authz.pool_serves`` and the view ``pool_orgs_served`` answer the same table of cases
(tests/control_plane/test_authz.py) on a real database, and every query about served
orgs follows the view.
"""

from __future__ import annotations

import pytest

from control_plane.policy import FailMode, Policy
from control_plane.store import Store
from tests.control_plane.store.conftest import ADMIN, Db, new_id
from tests.control_plane.test_authz import CASES


async def _served(db: Db, pool: str) -> set[str]:
    return set(db.sql(f"SELECT org_id FROM pool_orgs_served WHERE pool = '{pool}'").split())


async def test_the_view_and_the_python_rule_agree_on_every_case(store: Store, db: Db) -> None:
    orgs = {False: new_id(), True: new_id()}  # by private_zen_only
    for private_only, org in orgs.items():
        await store.create_org(ADMIN, org, org, Policy(private_zen_only=private_only))
    legacy = new_id()  # a policy stored before private_zen_only existed: not private
    await store.create_org(ADMIN, legacy, legacy, Policy())
    db.sql(f"UPDATE organizations SET policy = policy - 'private_zen_only' WHERE org_id = '{legacy}'")
    pools = {}
    for visibility in ("public", "private"):
        for bound in (False, True):
            pools[visibility, bound] = name = new_id("p")
            await store.register_pool(ADMIN, name, visibility, [*orgs.values(), legacy] if bound else [])
    checked = 0
    for visibility, bound, private_only, want in CASES + [(v, b, None, None) for v, b in pools]:
        pool = await store.get_pool(pools[visibility, bound])
        assert pool is not None
        org_id = legacy if private_only is None else orgs[private_only]
        org = await store.get_org(org_id)
        assert org is not None
        if private_only is None:  # the legacy org: as one that is not private-only
            want = next(c[3] for c in CASES if c[:3] == (visibility, bound, False))
        python = pool.serves(org_id, org.policy.private_zen_only)
        sql = org_id in await _served(db, pool.name)
        assert (python, sql) == (want, want), (visibility, bound, private_only)
        checked += 1
    assert checked == len(CASES) + 4


async def test_every_served_orgs_query_follows_the_view(store: Store, db: Db) -> None:
    """Redefine the view (to serve nothing, then everything): orgs_served, unserved,
    serves_fail_closed and the ACCESS_REVOKED events of a re-registration all follow it."""
    org = new_id()
    await store.create_org(ADMIN, org, org, Policy(fail_mode=FailMode.CLOSED))
    pool = new_id("p")
    await store.register_pool(ADMIN, pool, "public", [])
    p = await store.get_pool(pool)
    assert p is not None and p.serves_fail_closed
    assert org in {o.org_id for o in await store.orgs_served(p)} and await store.unserved(pool, [org]) == []
    try:
        db.sql("CREATE OR REPLACE VIEW pool_orgs_served AS SELECT p.name AS pool, o.org_id"
               " FROM zen_pools p JOIN organizations o ON false")
        p = await store.get_pool(pool)
        assert p is not None and not p.serves_fail_closed
        assert await store.orgs_served(p) == [] and await store.unserved(pool, [org]) == [org]
        private = new_id("p")
        await store.register_pool(ADMIN, private, "private", [org])
        db.sql("CREATE OR REPLACE VIEW pool_orgs_served AS SELECT p.name AS pool, o.org_id"
               " FROM zen_pools p JOIN organizations o ON true")
        assert org in {o.org_id for o in await store.orgs_served(p)}
        seq = await store.last_event_seq()
        await store.register_pool(ADMIN, private, "private", [])  # unbound, yet served by this view: not lost
        assert [e for e in await store.events_after(seq) if e.kind == "access_revoked"] == []
    finally:
        await store.migrate()  # the real view again
    assert await store.unserved(pool, [org, "o-missing"]) == ["o-missing"]


@pytest.mark.parametrize("visibility", ["public", "private"])
async def test_a_pool_losing_an_org_revokes_it_for_that_pool(store: Store, visibility: str) -> None:
    kept, lost = new_id(), new_id()
    for o in (kept, lost):
        await store.create_org(ADMIN, o, o, Policy())
    pool = new_id("p")
    await store.register_pool(ADMIN, pool, visibility, [kept, lost] if visibility == "private" else [])
    seq = await store.last_event_seq()
    if visibility == "private":
        await store.register_pool(ADMIN, pool, "private", [kept])
    else:
        await store.update_policy(ADMIN, lost, Policy(private_zen_only=True), 0)
    revoked = [e for e in await store.events_after(seq) if e.kind == "access_revoked"]
    assert [e.org_id for e in revoked] == [lost]
