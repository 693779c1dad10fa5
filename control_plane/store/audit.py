"""The audit log: a hash chain of rows (:mod:`control_plane.auditchain`).

Contract: :func:`append_audit` appends one row inside the caller's write
transaction, so an action and its audit row commit together or not at all;
the write lock orders the chain (gap-free ``seq``, each row hashing the one
before). :meth:`Audit.audit` is for what has no transaction of its own
(refusals, failures); :meth:`Audit.audit_many` appends several rows in one
transaction, in their order, chained from the head it reads under the lock
(the KeySent rows of concurrent calls: :mod:`control_plane.spool`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from control_plane import auditchain
from control_plane.store.rows import Actor
from control_plane.store.tx import Conn, Database

INSERT = ("INSERT INTO audit_events (seq, at, actor, action, org_id, key_id, outcome, detail, prev_hash, hash)"
          " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)")


@dataclass(frozen=True)
class AuditEntry:
    """One audit event to append (:meth:`Audit.audit_many`); ``seq``, time and hashes are given
    when it is written."""

    actor: Actor
    action: str
    org_id: str = ""
    key_id: str = ""
    outcome: str = "ok"
    detail: str = ""


async def append_audit_many(conn: Conn, entries: Sequence[AuditEntry]) -> list[int]:
    """Append ``entries`` in order inside the caller's write transaction (which holds the write
    lock); return their seqs."""
    cur = await conn.execute("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
    last = await cur.fetchone()
    first = (last["seq"] + 1) if last else 1
    prev = bytes(last["hash"]) if last else auditchain.GENESIS
    recs = [auditchain.AuditRecord(seq=first + i, at=dt.datetime.now(dt.UTC), actor=e.actor.spiffe_id,
                                   action=e.action, org_id=e.org_id, key_id=e.key_id, outcome=e.outcome,
                                   detail=e.detail[:500])
            for i, e in enumerate(entries)]
    rows = [(r.seq, r.at, r.actor, r.action, r.org_id, r.key_id, r.outcome, r.detail, p, h)
            for r, p, h in auditchain.extend(prev, recs)]
    if len(rows) == 1:
        await conn.execute(INSERT, rows[0])
    elif rows:
        async with conn.cursor() as c:
            await c.executemany(INSERT, rows)  # pipelined: one round trip
    return [r.seq for r in recs]


async def append_audit(conn: Conn, actor: Actor, action: str, *, org_id: str = "", key_id: str = "",
                       outcome: str = "ok", detail: str = "") -> int:
    seqs = await append_audit_many(conn, [AuditEntry(actor, action, org_id, key_id, outcome, detail)])
    return seqs[0]


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

    async def audit_many(self, entries: Sequence[AuditEntry]) -> None:
        """Append ``entries``, in order, in ONE write transaction (one commit waiting for the
        standbys): all of them or none."""
        if not entries:
            return
        async with self._tx(write=True) as conn:
            await append_audit_many(conn, entries)

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
