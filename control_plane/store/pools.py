"""ZEN pools: which orgs each pool serves.

Contract: which orgs a pool serves is asked of the view ``pool_orgs_served``
(schema.sql), the SQL form of :func:`control_plane.authz.pool_serves`, and of
nothing else. A change of a pool's visibility or bindings, and its
deregistration, write in the same transaction an ``access_revoked`` event
for every org the pool no longer serves (its ZENs drop those keys).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from control_plane.errors import NotFound
from control_plane.store.rows import NO_REQUEST, Actor, OrgRow, PoolRow, RequestKey, org_row
from control_plane.store.tx import Conn
from control_plane.store.work import Writes


async def pool_row(conn: Conn, name: str) -> PoolRow | None:
    cur = await conn.execute("SELECT visibility FROM zen_pools WHERE name = %s", (name,))
    r = await cur.fetchone()
    if r is None:
        return None
    cur = await conn.execute("SELECT org_id FROM zen_pool_orgs WHERE pool = %s ORDER BY org_id", (name,))
    orgs = tuple(x["org_id"] for x in await cur.fetchall())
    cur = await conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pool_orgs_served s JOIN organizations o USING (org_id)"
        " WHERE s.pool = %s AND o.policy->>'fail_mode' = 'closed') AS closed", (name,))
    closed = await cur.fetchone()
    return PoolRow(name=name, visibility=r["visibility"], org_ids=orgs,
                   serves_fail_closed=bool(closed and closed["closed"]))


async def served_ids(conn: Conn, pool: str) -> set[str]:
    """The orgs ``pool`` serves (none when it is not registered)."""
    cur = await conn.execute("SELECT org_id FROM pool_orgs_served WHERE pool = %s", (pool,))
    return {r["org_id"] for r in await cur.fetchall()}


async def serving_pools(conn: Conn, org_id: str) -> set[str]:
    """The pools that serve ``org_id``."""
    cur = await conn.execute("SELECT pool FROM pool_orgs_served WHERE org_id = %s", (org_id,))
    return {r["pool"] for r in await cur.fetchall()}


class Pools(Writes):
    async def get_pool(self, name: str) -> PoolRow | None:
        """Replica-ok: used to authorize key distribution."""
        return await self._replica_read(lambda conn: pool_row(conn, name))

    async def orgs_served(self, pool: PoolRow) -> list[OrgRow]:
        """Every org the pool serves (replica-ok: distribution)."""
        async def q(conn: Conn) -> list[OrgRow]:
            cur = await conn.execute(
                "SELECT o.*, (SELECT k.key_id FROM intermediate_keys k WHERE k.org_id = o.org_id"
                " AND k.state = 'active') AS active_key_id"
                " FROM pool_orgs_served s JOIN organizations o USING (org_id)"
                " WHERE s.pool = %s ORDER BY o.org_id", (pool.name,))
            return [org_row(r) for r in await cur.fetchall()]
        return await self._replica_read(q)

    async def unserved(self, pool: str, org_ids: Collection[str]) -> list[str]:
        """Those of ``org_ids`` the pool does not serve, missing orgs included, sorted
        (replica-ok: distribution)."""
        async def q(conn: Conn) -> list[str]:
            cur = await conn.execute(
                "SELECT x.org_id FROM unnest(%s::text[]) AS x(org_id) WHERE NOT EXISTS"
                " (SELECT 1 FROM pool_orgs_served s WHERE s.pool = %s AND s.org_id = x.org_id) ORDER BY 1",
                (sorted(org_ids), pool))
            return [r["org_id"] for r in await cur.fetchall()]
        return await self._replica_read(q) if org_ids else []

    async def list_pools(self) -> list[PoolRow]:
        async with self._tx(write=False) as conn:
            cur = await conn.execute("SELECT name FROM zen_pools ORDER BY name")
            names = [r["name"] for r in await cur.fetchall()]
            out = []
            for n in names:
                p = await pool_row(conn, n)
                if p:
                    out.append(p)
            return out

    async def register_pool(self, actor: Actor, name: str, visibility: str, org_ids: list[str],
                            request_id: RequestKey = NO_REQUEST) -> PoolRow:
        """Create or update a pool. A change of visibility or of bound orgs
        revokes, in the same transaction, every org the pool no longer serves
        (its ZENs drop those keys on the ACCESS_REVOKED event). The operator
        moves a pool's pods to dedicated nodes *before* registering it private.
        A replay answers with the pool as it is (as it was registered, if it is gone since)."""
        bound = sorted(set(org_ids))
        async with self._work(actor, "RegisterZenPool", request_id) as w:
            old = await pool_row(w.conn, name)
            if w.replayed is not None:
                return old or _stored_pool(name, w.replayed)
            if bound:
                cur = await w.conn.execute("SELECT org_id FROM organizations WHERE org_id = ANY(%s)", (bound,))
                unknown = sorted(set(bound) - {r["org_id"] for r in await cur.fetchall()})
                if unknown:
                    raise NotFound(f"organization(s) not found: {', '.join(unknown)}")
            before = await served_ids(w.conn, name)
            if old is None:
                await w.conn.execute("INSERT INTO zen_pools (name, visibility) VALUES (%s, %s)", (name, visibility))
            else:
                await w.conn.execute("UPDATE zen_pools SET visibility = %s, updated_at = now() WHERE name = %s",
                                     (visibility, name))
            await w.conn.execute("DELETE FROM zen_pool_orgs WHERE pool = %s", (name,))
            for o in bound:
                await w.conn.execute("INSERT INTO zen_pool_orgs (pool, org_id) VALUES (%s, %s)", (name, o))
            row = await pool_row(w.conn, name)
            assert row is not None
            w.result = {"pool": name, "visibility": visibility, "org_ids": bound}
            for o in sorted(before - await served_ids(w.conn, name)):
                w.emit(o, "access_revoked", audience=[name])
            change = f" (was {old.visibility})" if old and old.visibility != visibility else ""
            w.audit(detail=f"pool={name} visibility={visibility}{change} orgs={','.join(bound)}")
        return row

    async def deregister_pool(self, actor: Actor, name: str, request_id: RequestKey = NO_REQUEST) -> PoolRow:
        """Delete a pool; every org it served gets ACCESS_REVOKED for it. A replay
        answers with the pool as it was deregistered."""
        async with self._work(actor, "DeregisterZenPool", request_id) as w:
            if w.replayed is not None:  # a retry of a deregistration that did commit
                return _stored_pool(name, w.replayed)
            old = await pool_row(w.conn, name)
            if old is None:
                raise NotFound(f"ZEN pool {name!r} is not registered")
            w.result = {"pool": name, "visibility": old.visibility, "org_ids": list(old.org_ids)}
            for o in sorted(await served_ids(w.conn, name)):
                w.emit(o, "access_revoked", audience=[name])
            await w.conn.execute("DELETE FROM zen_pools WHERE name = %s", (name,))
            w.audit(detail=f"pool={name} visibility={old.visibility}")
        return old


def _stored_pool(name: str, result: dict[str, Any]) -> PoolRow:
    """The pool a request log entry describes (entries of registrations before the
    unit of work named the pool only: such a pool is gone for the caller)."""
    if "visibility" not in result:
        raise NotFound(f"ZEN pool {name!r} is not registered")
    return PoolRow(name=name, visibility=result["visibility"], org_ids=tuple(result["org_ids"]))
