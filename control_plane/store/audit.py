"""The audit log: a hash chain of rows (:mod:`control_plane.auditchain`).

Contract: :func:`append_audit` appends one row inside the caller's write
transaction, so an action and its audit row commit together or not at all;
the write lock orders the chain (gap-free ``seq``, each row hashing the one
before). :meth:`Audit.audit` is for what has no transaction of its own
(refusals, failures, keys sent).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from control_plane import auditchain
from control_plane.store.rows import Actor
from control_plane.store.tx import Conn, Database


async def append_audit(conn: Conn, actor: Actor, action: str, *, org_id: str = "", key_id: str = "",
                       outcome: str = "ok", detail: str = "") -> int:
    cur = await conn.execute("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
    last = await cur.fetchone()
    seq = (last["seq"] + 1) if last else 1
    prev = bytes(last["hash"]) if last else auditchain.GENESIS
    rec = auditchain.AuditRecord(
        seq=seq, at=dt.datetime.now(dt.UTC), actor=actor.spiffe_id, action=action,
        org_id=org_id, key_id=key_id, outcome=outcome, detail=detail[:500],
    )
    await conn.execute(
        "INSERT INTO audit_events (seq, at, actor, action, org_id, key_id, outcome, detail, prev_hash, hash)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (rec.seq, rec.at, rec.actor, rec.action, rec.org_id, rec.key_id, rec.outcome, rec.detail,
         prev, auditchain.link(prev, rec)),
    )
    return seq


def _record(r: dict[str, Any]) -> auditchain.AuditRecord:
    return auditchain.AuditRecord(seq=r["seq"], at=r["at"], actor=r["actor"], action=r["action"],
                                  org_id=r["org_id"], key_id=r["key_id"], outcome=r["outcome"],
                                  detail=r["detail"])


class Audit(Database):
    async def audit(self, actor: Actor, action: str, *, org_id: str = "", key_id: str = "",
                    outcome: str = "ok", detail: str = "") -> None:
        """Append one audit event in its own transaction (refusals, failures)."""
        async with self._tx(write=True) as conn:
            await append_audit(conn, actor, action, org_id=org_id, key_id=key_id, outcome=outcome, detail=detail)

    async def list_audit(self, org_id: str | None, after_seq: int, limit: int
                         ) -> list[tuple[auditchain.AuditRecord, bytes]]:
        async with self._tx(write=False) as conn:
            if org_id is None:
                cur = await conn.execute(
                    "SELECT * FROM audit_events WHERE seq > %s ORDER BY seq LIMIT %s", (after_seq, limit))
            else:
                cur = await conn.execute(
                    "SELECT * FROM audit_events WHERE seq > %s AND org_id = %s ORDER BY seq LIMIT %s",
                    (after_seq, org_id, limit))
            rows = await cur.fetchall()
        return [(_record(r), bytes(r["hash"])) for r in rows]

    async def verify_audit(self) -> auditchain.Verdict:
        async with self._tx(write=False) as conn:
            cur = await conn.execute("SELECT * FROM audit_events ORDER BY seq")
            rows = await cur.fetchall()
        return auditchain.verify((_record(r), bytes(r["prev_hash"]), bytes(r["hash"])) for r in rows)
