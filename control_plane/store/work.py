"""The unit of work: every admin write, idempotent, in one fixed order.

Contract
--------
``async with self._work(actor, action, request_id) as w:`` opens ONE write
transaction and, before the body runs:

1. takes the write lock (:meth:`Database._tx`), then
2. looks up ``request_id`` in ``request_log``: ``w.replayed`` is the stored
   result of a request already applied (the same id with another caller,
   call or parameters is refused with :class:`InvalidArgument`).

The body then either answers a replay from ``w.replayed`` and returns,
mutating nothing (the unit still waits for the synchronous standbys to hold
the replayed request before it answers: :func:`confirm`), or mutates through
``w.conn`` and queues what the write produced: ``w.result`` (what a retry will be answered from),
``w.emit(...)`` (key events), ``w.audit(...)`` (the detail of its audit row).
When the body ends without an exception, the unit ALWAYS, in this order:

3. remembers the request (``request_log``: request id, actor, call and
   parameters' digest, result), when it has an id;
4. writes the queued events (:func:`control_plane.store.events.emit`);
5. appends the audit row (:func:`control_plane.store.audit.append_audit`);

and commits. An exception anywhere rolls all of it back: nothing is
remembered, emitted or audited for a write that did not happen (the
service audits the refusal in a transaction of its own).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from control_plane.errors import InvalidArgument
from control_plane.store.audit import append_audit
from control_plane.store.events import NewEvent, emit
from control_plane.store.rows import NO_REQUEST, Actor, RequestKey
from control_plane.store.tx import Conn, Database


async def replay(conn: Conn, request_id: RequestKey, actor: Actor, action: str) -> dict[str, Any] | None:
    """The stored result of ``request_id``, or None when it was never applied."""
    if not request_id.id:
        return None
    cur = await conn.execute("SELECT actor, action, result FROM request_log WHERE request_id = %s",
                             (request_id.id,))
    r = await cur.fetchone()
    if r is None:
        return None
    if r["actor"] != actor.spiffe_id or r["action"] != f"{action}#{request_id.params}":
        raise InvalidArgument(f"request_id {request_id.id} was already used for another call or other "
                              "parameters; use a fresh one")
    return dict(r["result"])


async def confirm(conn: Conn) -> None:
    """Make this transaction's COMMIT wait for the synchronous standbys past a replayed request.

    A request found in ``request_log`` may be committed on the primary only: its first attempt
    ended "outcome unknown" because the standbys' confirmation was cancelled at the deadline,
    and Postgres keeps such a commit, visible. Answering a retry from it at once would
    acknowledge a write the standbys may lack (lost on failover). A transaction that wrote no
    WAL does not wait for the standbys at COMMIT; this one writes a transactional WAL message
    (no table changes), so its COMMIT waits for ``ANY k`` confirmations of a WAL position past
    the original commit, and the deadline ends that wait with :class:`CommitUnknown` as for any
    write: the retry is acknowledged only once the standbys hold the write."""
    await conn.execute("SELECT pg_logical_emit_message(true, 'keyward-replay', '')")


async def remember(conn: Conn, request_id: RequestKey, actor: Actor, action: str, result: dict[str, Any]) -> None:
    if request_id.id:
        await conn.execute(
            "INSERT INTO request_log (request_id, actor, action, result) VALUES (%s, %s, %s, %s)",
            (request_id.id, actor.spiffe_id, f"{action}#{request_id.params}", json.dumps(result)))


@dataclass
class _AuditRow:
    org_id: str = ""
    key_id: str = ""
    detail: str = ""


@dataclass
class Work:
    """One write in progress: its transaction, and what it has queued."""

    conn: Conn
    replayed: dict[str, Any] | None
    """The stored result when this request was applied already: answer from it, change nothing."""
    result: dict[str, Any] = field(default_factory=dict)
    """What a retry with the same request id is answered from (JSON)."""
    events: list[NewEvent] = field(default_factory=list)
    audit_row: _AuditRow | None = None

    def emit(self, org_id: str, kind: str, *, key_id: str = "", version: int = 0, policy_version: int = 0,
             audience: Collection[str] | None = None) -> None:
        """Queue an event; ``audience`` None: for the pools serving the org when it is written
        (after every change of this write), see :mod:`control_plane.store.events`."""
        self.events.append(NewEvent(org_id, kind, key_id=key_id, version=version, policy_version=policy_version,
                                    audience=None if audience is None else tuple(sorted(audience))))

    def audit(self, *, org_id: str = "", key_id: str = "", detail: str = "") -> None:
        self.audit_row = _AuditRow(org_id, key_id, detail)


class Writes(Database):
    @asynccontextmanager
    async def _work(self, actor: Actor, action: str, request_id: RequestKey = NO_REQUEST) -> AsyncIterator[Work]:
        """The unit of work (see the module's contract)."""
        async with self._tx(write=True) as conn:
            w = Work(conn, await replay(conn, request_id, actor, action))
            yield w
            if w.replayed is not None:
                assert not w.events and w.audit_row is None, f"{action}: a replay must change nothing"
                await confirm(conn)
                return
            await remember(conn, request_id, actor, action, w.result)
            for ev in w.events:
                await emit(conn, ev)
            a = w.audit_row or _AuditRow()
            await append_audit(conn, actor, action, org_id=a.org_id, key_id=a.key_id, detail=a.detail)

    async def replayed(self, request_id: RequestKey, actor: Actor, action: str) -> dict[str, Any] | None:
        """The stored result of an already-applied request, if any (a read: lets the
        caller skip costly work, e.g. generating a key, for a retry)."""
        if not request_id.id:
            return None
        async with self._tx(write=False) as conn:
            found = await replay(conn, request_id, actor, action)
        if found is not None:  # answered only once the standbys hold it (see confirm)
            async with self._tx(write=True) as conn:
                await confirm(conn)
        return found
