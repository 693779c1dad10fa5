"""control_plane.store.events: each event's audience is fixed when it is written."""

from __future__ import annotations

import pytest

from control_plane.policy import Policy
from control_plane.store import KeyEventRow, Store
from tests.control_plane.store.conftest import ADMIN, Db, new_id
from tests.control_plane.store.test_work import accept, pending_key


async def _since(store: Store, seq: int) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(e.kind, e.org_id, e.audience) for e in await store.events_after(seq)]


@pytest.fixture
async def pools(store: Store) -> tuple[str, str]:
    """A public pool and a private one, made for the test (other tests' pools exist too)."""
    public, private = new_id("pa"), new_id("pb")
    await store.register_pool(ADMIN, public, "public", [])
    await store.register_pool(ADMIN, private, "private", [])
    return public, private


async def test_an_event_is_for_the_pools_serving_its_org_when_written(store: Store, pools: tuple[str, str]) -> None:
    public, private = pools
    everyone = {p.name for p in await store.list_pools() if p.visibility == "public"}
    org = new_id()
    seq = await store.last_event_seq()
    await store.create_org(ADMIN, org, org, Policy())
    await store.register_pool(ADMIN, private, "private", [org])
    await store.add_pending_key(ADMIN, pending_key(org))
    await store.activate(ADMIN, org, accept)
    await store.update_policy(ADMIN, org, Policy(private_zen_only=True), 0)
    await store.update_policy(ADMIN, org, Policy(private_zen_only=True, blocked_hosts=("x.test",)), 0)
    await store.register_pool(ADMIN, private, "private", [])
    events = await _since(store, seq)
    assert events == [
        ("policy_changed", org, tuple(sorted(everyone))),  # created: every public pool, not yet the private one
        ("rotated", org, tuple(sorted(everyone | {private}))),
        ("access_revoked", org, tuple(sorted(everyone))),  # made private-only: the public pools lose it
        ("policy_changed", org, (private,)),
        ("policy_changed", org, (private,)),
        ("access_revoked", org, (private,)),  # unbound
    ]
    assert public in everyone


async def test_deregistering_revokes_each_served_org_for_that_pool_alone(store: Store, pools: tuple[str, str]) -> None:
    _, private = pools
    a, b = sorted((new_id(), new_id()))
    for o in (a, b):
        await store.create_org(ADMIN, o, o, Policy(private_zen_only=True))
    await store.register_pool(ADMIN, private, "private", [a, b])
    seq = await store.last_event_seq()
    await store.deregister_pool(ADMIN, private)
    assert await _since(store, seq) == [("access_revoked", a, (private,)), ("access_revoked", b, (private,))]
    await store.add_pending_key(ADMIN, pending_key(a))
    await store.activate(ADMIN, a, accept)
    assert (await _since(store, seq))[-1] == ("rotated", a, ())  # served by no pool now


async def test_events_of_the_old_layout_are_given_their_pools(store: Store, db: Db, pools: tuple[str, str]) -> None:
    """A database written before audiences were pools: '' (the pools serving the org), 'public'
    (the public pools), 'pool:<name>' (that pool); migrate() turns each into the pools it names."""
    public, private = pools
    org = new_id()
    await store.create_org(ADMIN, org, org, Policy())
    await store.register_pool(ADMIN, private, "private", [org])
    serving = tuple(sorted(p.name for p in await store.list_pools() if p.serves(org, False)))
    publics = tuple(sorted(p.name for p in await store.list_pools() if p.visibility == "public"))
    assert private in serving and public in publics
    seq = await store.last_event_seq()
    db.sql("ALTER TABLE key_events DROP COLUMN audience;"
           "ALTER TABLE key_events ADD COLUMN audience text NOT NULL DEFAULT '';"
           f"INSERT INTO key_events (org_id, kind, audience) VALUES ('{org}', 'rotated', ''),"
           f" ('{org}', 'access_revoked', 'public'), ('{org}', 'access_revoked', 'pool:gone-pool')")
    await store.migrate()
    await store.migrate()  # once done, a no-op
    assert await _since(store, seq) == [("rotated", org, serving), ("access_revoked", org, publics),
                                        ("access_revoked", org, ("gone-pool",))]
    assert db.sql("SELECT data_type FROM information_schema.columns WHERE table_name = 'key_events'"
                  " AND column_name = 'audience'") == "ARRAY"
    assert isinstance((await store.events_after(seq))[0], KeyEventRow)
