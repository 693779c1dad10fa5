"""The key-event log (``key_events``): what WatchKeys streams are made of.

Contract
--------
* :func:`emit` appends an event inside the caller's write transaction and
  notifies :data:`NOTIFY_CHANNEL` (delivered at commit, never before). Events
  carry no key material and no policy, only ids, numbers and their audience,
  so a batch of :meth:`Events.events_after` is bounded in bytes as well as in
  rows. Reads are replica-ok: the event log is distribution.
* Each event's **audience** is fixed when it is written: the names of the
  pools it is for. An event about an org (rotated, revoked, policy_changed)
  is for the pools that serve the org in the writing transaction, after its
  change (the view ``pool_orgs_served``); an ``access_revoked`` is for exactly
  the pools that lose the org by that change. Delivery is then a pure check,
  :func:`control_plane.authz.event_reaches`: no read per event per watcher.

Why "when written" is right when a pool's bindings change afterwards: the
log is a history, and a stream is the part of it the pool was entitled to,
in commit order. Every change that ends a pool's service of an org writes,
in that same transaction, the ``access_revoked`` for that pool; so a pool
that lost an org is told so right after the last event it was entitled to,
and hears nothing of it afterwards. A pool that gains an org was not
entitled to its earlier events and is not sent them, live or replayed (a
check at delivery time once sent a replaying public pool the rotations an
org made while it was private-only); it learns the org's policy and key
from GetKeyPair, which applies the rule of the moment. A live stream and a
replay of the same range therefore carry the same events.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection

from control_plane.store.rows import KeyEventRow, event_row
from control_plane.store.tx import Conn, Database, db_errors

NOTIFY_CHANNEL = "keyward_key_events"


@dataclass(frozen=True)
class NewEvent:
    """An event to write (its ``seq`` and time are the database's)."""

    org_id: str
    kind: str
    key_id: str = ""
    version: int = 0
    policy_version: int = 0
    audience: tuple[str, ...] | None = None
    """The pools it is for; None: the pools serving the org when it is written."""


async def emit(conn: Conn, ev: NewEvent) -> None:
    await conn.execute(
        "INSERT INTO key_events (org_id, kind, key_id, version, policy_version, audience)"
        " VALUES (%s, %s, %s, %s, %s, coalesce(%s::text[],"
        " ARRAY(SELECT s.pool FROM pool_orgs_served s WHERE s.org_id = %s ORDER BY s.pool)))",
        (ev.org_id, ev.kind, ev.key_id, ev.version, ev.policy_version,
         None if ev.audience is None else sorted(ev.audience), ev.org_id),
    )
    await conn.execute("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))


class Events(Database):
    async def events_after(self, seq: int, limit: int = 500) -> list[KeyEventRow]:
        """At most ``limit`` events after ``seq``. Every column is short and bounded (ids,
        names, numbers, the names of the pools serving the org), so a batch is bounded in
        bytes too: about 200 bytes an event, and a pool's name for each pool it is for."""
        async def q(conn: Conn) -> list[KeyEventRow]:
            cur = await conn.execute("SELECT seq, org_id, kind, key_id, version, policy_version, audience, at"
                                     " FROM key_events WHERE seq > %s ORDER BY seq LIMIT %s",
                                     (seq, limit))
            return [event_row(r) for r in await cur.fetchall()]
        return await self._replica_read(q, one_statement=True)

    async def last_event_seq(self) -> int:
        async def q(conn: Conn) -> int:
            cur = await conn.execute("SELECT coalesce(max(seq), 0) AS s FROM key_events")
            row = await cur.fetchone()
            return int(row["s"]) if row else 0
        return await self._replica_read(q, one_statement=True)

    async def notifications(self) -> AsyncIterator[None]:
        """Yield each time key events may have been added (LISTEN on the primary). The
        caller polls as well, with its own timer: a lost notification delays, never loses.
        (``notifies(timeout=...)`` never returned inside the CA's event loop, so no timeout here.)"""
        with db_errors():
            extra: dict[str, Any] = {"password": self._password} if self._password is not None else {}
            conn = await AsyncConnection.connect(self._dsn, autocommit=True, **extra)
        try:
            with db_errors():
                await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                async for _ in conn.notifies():
                    yield None
        finally:
            await conn.close()
