"""Organizations: their policy and its version.

Contract: an org is created once and never deleted; every policy change bumps
``policy_version`` and writes a ``policy_changed`` event (ZENs serving the org
learn it at once), in the transaction that makes it, after an
``access_revoked`` for the pools the change takes the org from (made
private-only: the public pools).
"""

from __future__ import annotations

import json

from control_plane.errors import Aborted, AlreadyExists, NotFound
from control_plane.policy import Policy
from control_plane.store.pools import serving_pools
from control_plane.store.rows import NO_REQUEST, Actor, OrgRow, RequestKey, org_row
from control_plane.store.tx import Conn
from control_plane.store.work import Writes

ORG_SELECT = """
SELECT o.*, (SELECT k.key_id FROM intermediate_keys k
             WHERE k.org_id = o.org_id AND k.state = 'active') AS active_key_id
FROM organizations o WHERE o.org_id = %s
"""
ORG_SELECT_WITHOUT_POLICY = ORG_SELECT.replace(
    "o.*", "o.org_id, o.display_name, o.policy_version, o.created_at, o.updated_at")


class Orgs(Writes):
    async def get_org(self, org_id: str, *, replica_ok: bool = False) -> OrgRow | None:
        async def q(conn: Conn) -> OrgRow | None:
            cur = await conn.execute(ORG_SELECT, (org_id,))
            r = await cur.fetchone()
            return org_row(r) if r else None
        return await self._read(q, replica_ok=replica_ok)

    async def create_org(self, actor: Actor, org_id: str, display_name: str, policy: Policy,
                         request_id: RequestKey = NO_REQUEST) -> OrgRow:
        async with self._work(actor, "CreateOrganization", request_id) as w:
            if w.replayed is None:
                cur = await w.conn.execute("SELECT 1 FROM organizations WHERE org_id = %s", (org_id,))
                if await cur.fetchone():
                    raise AlreadyExists(f"organization {org_id!r} exists already")
                await w.conn.execute(
                    "INSERT INTO organizations (org_id, display_name, policy) VALUES (%s, %s, %s)",
                    (org_id, display_name, json.dumps(policy.to_json())))
                w.result = {"org_id": org_id}
                # ZENs serving the org learn its policy (networks, credential verifiers) at once.
                w.emit(org_id, "policy_changed", policy_version=1)
                w.audit(org_id=org_id, detail=f"private_zen_only={policy.private_zen_only}")
            cur = await w.conn.execute(ORG_SELECT, (org_id,))
            r = await cur.fetchone()
            if r is None:  # a replay whose org is gone
                raise NotFound(f"organization {org_id!r} not found")
        return org_row(r)

    async def update_policy(self, actor: Actor, org_id: str, policy: Policy, expected_version: int,
                            request_id: RequestKey = NO_REQUEST) -> OrgRow:
        async with self._work(actor, "UpdatePolicy", request_id) as w:
            if w.replayed is not None:
                cur = await w.conn.execute(ORG_SELECT, (org_id,))
                r0 = await cur.fetchone()
                if r0 is None:
                    raise NotFound(f"organization {org_id!r} not found")
                return org_row(r0)
            cur = await w.conn.execute("SELECT * FROM organizations WHERE org_id = %s FOR UPDATE", (org_id,))
            old = await cur.fetchone()
            if old is None:
                raise NotFound(f"organization {org_id!r} not found")
            if expected_version and expected_version != old["policy_version"]:
                raise Aborted(
                    f"policy of {org_id!r} is at version {old['policy_version']}, not {expected_version}: "
                    "re-read it and apply your change again")
            new_version = old["policy_version"] + 1
            before = await serving_pools(w.conn, org_id)
            await w.conn.execute(
                "UPDATE organizations SET policy = %s, policy_version = %s, updated_at = now() WHERE org_id = %s",
                (json.dumps(policy.to_json()), new_version, org_id))
            w.result = {"org_id": org_id}
            lost = before - await serving_pools(w.conn, org_id)
            if lost:
                # Made private-only: the public pools lose the org and must drop its key now.
                w.emit(org_id, "access_revoked", audience=lost)
            w.emit(org_id, "policy_changed", policy_version=new_version)
            w.audit(org_id=org_id, detail=f"policy_version={new_version} private_zen_only={policy.private_zen_only}")
            # The policy just written is known: read back the rest only (re-parsing a large
            # policy's JSON would cost the event loop as much as writing it).
            cur = await w.conn.execute(ORG_SELECT_WITHOUT_POLICY, (org_id,))
            r = await cur.fetchone()
        assert r is not None
        return org_row({**r, "policy": None}, policy)
