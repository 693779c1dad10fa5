"""Postgres storage of the CA: the only module that touches psycopg.

Contract
--------
* Every write is one transaction that also appends its audit row, so an
  action and its audit event commit together or not at all.
* Write transactions take one advisory lock first. Admin writes are rare;
  serializing them makes the audit chain and the key-event sequence strictly
  ordered by commit, so a watcher reading ``seq > last`` never skips a row.
* Retiring a key (rotation, revocation, discarding a pending key) is a hard
  DELETE of its row, sealed key and certificate, in the same transaction;
  only a metadata tombstone (fingerprint, serial, dates) is kept. It calls
  ``on_retire``: the CA then removes the WAL that carried the key from every
  server's pg_wal in the background (:meth:`Store.forget_retired_wal`).
* Library errors become :mod:`control_plane.errors` classes: an unreachable
  database is :class:`Unavailable`, a duplicate is :class:`AlreadyExists`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from control_plane import auditchain
from control_plane.certs import CertInfo, KeyAlgorithm
from control_plane.custody import PendingKey
from control_plane.deadline import remaining
from control_plane.errors import (
    Aborted,
    AlreadyExists,
    CommitUnknown,
    ConfigError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    KeywardError,
    NotFound,
    Unavailable,
)

T = TypeVar("T")
from control_plane.policy import Policy

_WRITE_LOCK = 0x6B657977  # "keyw": one advisory lock serializes CA writes
NOTIFY_CHANNEL = "keyward_key_events"

# Answers only where the whole schema exists (its last table): what "ready" needs.
SCHEMA_PROBE = "SELECT 1 FROM audit_events LIMIT 0"
SCHEMA = """
CREATE TABLE IF NOT EXISTS organizations (
    org_id          text PRIMARY KEY,
    display_name    text NOT NULL,
    policy          jsonb NOT NULL,
    policy_version  bigint NOT NULL DEFAULT 1,
    key_version     bigint NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS zen_pools (
    name        text PRIMARY KEY,
    visibility  text NOT NULL CHECK (visibility IN ('public', 'private')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS zen_pool_orgs (
    pool    text NOT NULL REFERENCES zen_pools(name) ON DELETE CASCADE,
    org_id  text NOT NULL REFERENCES organizations(org_id) ON DELETE CASCADE,
    PRIMARY KEY (pool, org_id)
);
CREATE TABLE IF NOT EXISTS intermediate_keys (
    key_id          uuid PRIMARY KEY,
    org_id          text NOT NULL REFERENCES organizations(org_id),
    state           text NOT NULL CHECK (state IN ('pending', 'active')),
    version         bigint,
    algorithm       text NOT NULL,
    keylib_format   text NOT NULL,
    spki_sha256     bytea NOT NULL,
    sealed_key      bytea NOT NULL,
    certificate_pem text,
    chain_pem       text,
    subject         text,
    serial_hex      text,
    not_before      timestamptz,
    not_after       timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    activated_at    timestamptz,
    CHECK ((state = 'active') = (certificate_pem IS NOT NULL))
);
CREATE UNIQUE INDEX IF NOT EXISTS intermediate_keys_one_active
    ON intermediate_keys (org_id) WHERE state = 'active';
CREATE UNIQUE INDEX IF NOT EXISTS intermediate_keys_one_pending
    ON intermediate_keys (org_id) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS intermediate_history (
    key_id        uuid PRIMARY KEY,
    org_id        text NOT NULL,
    state         text NOT NULL CHECK (state IN ('rotated', 'revoked', 'discarded')),
    version       bigint,
    algorithm     text NOT NULL,
    spki_sha256   bytea NOT NULL,
    subject       text,
    serial_hex    text,
    not_before    timestamptz,
    not_after     timestamptz,
    created_at    timestamptz NOT NULL,
    activated_at  timestamptz,
    ended_at      timestamptz NOT NULL DEFAULT now(),
    reason        text NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS key_events (
    seq             bigserial PRIMARY KEY,
    org_id          text NOT NULL,
    kind            text NOT NULL,
    key_id          text NOT NULL DEFAULT '',
    version         bigint NOT NULL DEFAULT 0,
    policy_version  bigint NOT NULL DEFAULT 0,
    audience        text NOT NULL DEFAULT '',
    at              timestamptz NOT NULL DEFAULT now()
);
-- Events reference a policy version, never carry the policy: a replay of the
-- log costs rows of a few hundred bytes, however large policies are.
ALTER TABLE key_events DROP COLUMN IF EXISTS policy;
-- after_seq 0 means "no replay" (proto3 cannot tell it from unset), so the first
-- real event must have seq >= 2: a ZEN told "the log ends at 0" would otherwise
-- resume with 0 and miss every event made while it was away. Never delivered.
INSERT INTO key_events (org_id, kind) SELECT '', 'genesis' WHERE NOT EXISTS (SELECT 1 FROM key_events);
CREATE TABLE IF NOT EXISTS request_log (
    request_id  text PRIMARY KEY,
    actor       text NOT NULL,
    action      text NOT NULL,
    result      jsonb NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
-- Key material and certificates must never be sampled into pg_statistic
-- (it would outlive a deleted row in every backup).
ALTER TABLE intermediate_keys ALTER COLUMN sealed_key SET STATISTICS 0;
ALTER TABLE intermediate_keys ALTER COLUMN certificate_pem SET STATISTICS 0;
ALTER TABLE intermediate_keys ALTER COLUMN chain_pem SET STATISTICS 0;
-- Stored as-is (no compression), so a byte-for-byte scan of a backup for a
-- retired key or certificate is meaningful.
ALTER TABLE intermediate_keys ALTER COLUMN sealed_key SET STORAGE EXTERNAL;
ALTER TABLE intermediate_keys ALTER COLUMN certificate_pem SET STORAGE EXTERNAL;
ALTER TABLE intermediate_keys ALTER COLUMN chain_pem SET STORAGE EXTERNAL;
CREATE TABLE IF NOT EXISTS audit_events (
    seq        bigint PRIMARY KEY,
    at         timestamptz NOT NULL,
    actor      text NOT NULL,
    action     text NOT NULL,
    org_id     text NOT NULL DEFAULT '',
    key_id     text NOT NULL DEFAULT '',
    outcome    text NOT NULL,
    detail     text NOT NULL DEFAULT '',
    prev_hash  bytea NOT NULL,
    hash       bytea NOT NULL
);
"""


@dataclass(frozen=True)
class OrgRow:
    org_id: str
    display_name: str
    policy: Policy
    policy_version: int
    active_key_id: str
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True)
class PoolRow:
    name: str
    visibility: str  # "public" | "private"
    org_ids: tuple[str, ...]
    serves_fail_closed: bool = False
    """At least one org it serves is fail-closed (the operator never bypasses it)."""

    def serves(self, org_id: str, private_zen_only: bool) -> bool:
        if self.visibility == "public":
            return not private_zen_only
        return org_id in self.org_ids


@dataclass(frozen=True)
class IntermediateRow:
    key_id: str
    org_id: str
    state: str  # pending | active | rotated | revoked | discarded
    version: int
    algorithm: KeyAlgorithm
    spki_sha256: bytes
    subject: str
    serial_hex: str
    not_before: dt.datetime | None
    not_after: dt.datetime | None
    created_at: dt.datetime
    activated_at: dt.datetime | None
    ended_at: dt.datetime | None


@dataclass(frozen=True)
class ActiveKey:
    org: OrgRow
    key_id: str
    version: int
    algorithm: KeyAlgorithm
    keylib_format: str
    spki_sha256: bytes
    sealed_key: bytes
    certificate_pem: str
    chain_pem: str
    not_after: dt.datetime

    def __repr__(self) -> str:
        return f"ActiveKey(org={self.org.org_id!r}, key_id={self.key_id!r}, version={self.version})"


@dataclass(frozen=True)
class KeyEventRow:
    seq: int
    org_id: str
    kind: str  # rotated | revoked | policy_changed | access_revoked (| genesis: the first row, never sent)
    key_id: str
    version: int
    policy_version: int
    """For policy_changed: the version the change made (the policy itself is the org's)."""
    audience: str  # "" (everyone serving the org) | "public" | "pool:<name>"
    at: dt.datetime


@dataclass(frozen=True)
class RequestKey:
    """An admin write's idempotency key: the caller's request_id and a digest
    of the request's other fields, so a reused id with other parameters is
    refused instead of answered with another call's result."""

    id: str = ""
    params: str = ""


NO_REQUEST = RequestKey()


@dataclass(frozen=True)
class Actor:
    """Who is acting, for the audit row."""

    spiffe_id: str


@contextmanager
def _db_errors() -> Iterator[None]:
    try:
        yield
    except KeywardError:
        raise
    except PoolTimeout as e:
        raise Unavailable("database unavailable: no connection could be had in time; retry later") from e
    except psycopg.errors.QueryCanceled as e:
        raise DeadlineExceeded("the database did not answer within the call's deadline; nothing was written") from e
    except psycopg.errors.UniqueViolation as e:
        raise AlreadyExists("the object exists already") from e
    except psycopg.errors.ForeignKeyViolation as e:
        raise FailedPrecondition("a referenced object does not exist") from e
    except psycopg.errors.ReadOnlySqlTransaction as e:
        raise Unavailable("the database server is read-only (a standby): no primary is reachable; retry later") from e
    except psycopg.OperationalError as e:
        raise Unavailable("database unavailable: no server could be reached; retry later") from e
    except psycopg.Error as e:
        raise Unavailable(f"database error ({type(e).__name__}); the request was not applied") from e


def _org(r: dict[str, Any], policy: Policy | None = None) -> OrgRow:
    return OrgRow(
        org_id=r["org_id"],
        display_name=r["display_name"],
        policy=policy if policy is not None else Policy.from_json(r["policy"]),
        policy_version=r["policy_version"],
        active_key_id=str(r["active_key_id"] or ""),
        created_at=r["created_at"],
        updated_at=r["updated_at"],
    )


_ORG_SELECT = """
SELECT o.*, (SELECT k.key_id FROM intermediate_keys k
             WHERE k.org_id = o.org_id AND k.state = 'active') AS active_key_id
FROM organizations o WHERE o.org_id = %s
"""
_ORG_SELECT_WITHOUT_POLICY = _ORG_SELECT.replace(
    "o.*", "o.org_id, o.display_name, o.policy_version, o.created_at, o.updated_at")


def _inter(r: dict[str, Any]) -> IntermediateRow:
    return IntermediateRow(
        key_id=str(r["key_id"]),
        org_id=r["org_id"],
        state=r["state"],
        version=r["version"] or 0,
        algorithm=KeyAlgorithm(r["algorithm"]),
        spki_sha256=bytes(r["spki_sha256"]),
        subject=r["subject"] or "",
        serial_hex=r["serial_hex"] or "",
        not_before=r["not_before"],
        not_after=r["not_after"],
        created_at=r["created_at"],
        activated_at=r["activated_at"],
        ended_at=r.get("ended_at"),
    )


def _event(r: dict[str, Any]) -> KeyEventRow:
    return KeyEventRow(
        seq=r["seq"], org_id=r["org_id"], kind=r["kind"], key_id=r["key_id"], version=r["version"],
        policy_version=r["policy_version"], audience=r["audience"], at=r["at"],
    )


class Store:
    """The CA's database. Create with :meth:`open`, release with :meth:`close`.

    Two pools over the same multi-host DSN: ``rw`` (target_session_attrs=
    read-write) for every write and for the reads that decide one; ``ro``
    (prefer-standby) for key-distribution reads, which fall back to ``rw``
    when no standby answers in time, so ZENs keep getting keys while the
    primary is down and admin writes never land on a standby.
    """

    READ_TIMEOUT = 2.0

    def __init__(self, dsn: str, rw: AsyncConnectionPool[Any], ro: AsyncConnectionPool[Any]) -> None:
        self._dsn = dsn
        self._rw = rw
        self._ro = ro
        self._notices: weakref.WeakKeyDictionary[Any, list[str]] = weakref.WeakKeyDictionary()
        self._pool_timeout = 5.0
        self._password: str | None = None
        self.on_retire: Callable[[], None] = lambda: None
        """Called inside a transaction that deletes a sealed key (must not block or raise):
        the CA wires it to its background WAL clean-up (:meth:`forget_retired_wal`)."""

    @staticmethod
    def derive_dsns(dsn: str) -> tuple[str, str]:
        """(read-write DSN, replica-ok DSN) from the configured DSN."""
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as e:
            raise ConfigError(f"KEYWARD_DB_DSN is not a valid libpq connection string: {e}") from None
        params.setdefault("connect_timeout", "3")
        rw = make_conninfo("", **{**params, "target_session_attrs": "read-write"})
        ro = make_conninfo("", **{**params, "target_session_attrs": "prefer-standby"})
        return rw, ro

    @classmethod
    async def open(cls, dsn: str, *, max_size: int = 8, timeout: float = 5.0, wait: bool = True,
                   password: str | None = None) -> Store:
        """``password``, when given, goes to libpq beside the DSN (never into it): read from a file
        of any mode, where a libpq passfile must be 0600 (a Secret volume with fsGroup is 0440)."""
        rw_dsn, ro_dsn = cls.derive_dsns(dsn)
        notices: weakref.WeakKeyDictionary[Any, list[str]] = weakref.WeakKeyDictionary()

        async def configure(conn: AsyncConnection[Any]) -> None:
            box: list[str] = []
            notices[conn] = box
            conn.add_notice_handler(lambda d: box.append(d.message_primary or ""))

        def pool(conninfo: str, name: str) -> AsyncConnectionPool[Any]:
            return AsyncConnectionPool(
                conninfo, min_size=1, max_size=max_size, timeout=timeout, open=False,
                kwargs={"row_factory": dict_row, "autocommit": False,
                        **({"password": password} if password is not None else {})}, configure=configure,
                check=AsyncConnectionPool.check_connection, name=name)

        rw, ro = pool(rw_dsn, "keyward-ca-rw"), pool(ro_dsn, "keyward-ca-ro")
        with _db_errors():
            await rw.open(wait=wait, timeout=timeout)
            await ro.open(wait=False)
        store = cls(rw_dsn, rw, ro)
        store._notices = notices
        store._pool_timeout = timeout
        store._password = password
        return store

    async def close(self) -> None:
        await self._ro.close()
        await self._rw.close()

    async def migrate(self) -> None:
        async with self._tx(write=True) as conn:
            await conn.execute(SCHEMA)

    @asynccontextmanager
    async def _tx(self, *, write: bool, replica_ok: bool = False
                  ) -> AsyncIterator[AsyncConnection[dict[str, Any]]]:
        """One transaction. Writes take the write lock, are bounded by the
        call's deadline (statement_timeout covers the wait for the standbys),
        and raise :class:`CommitUnknown` when Postgres committed locally but
        the standbys' confirmation was cancelled, or the server went away
        during COMMIT: such a write is NOT acknowledged."""
        pool = self._ro if replica_ok else self._rw
        # Waiting for a connection is bounded by the call's deadline too, so a
        # missing primary is answered UNAVAILABLE in time, not by the client's timeout.
        wait = max(0.1, min(self._pool_timeout, remaining(self._pool_timeout) - 0.3))
        with _db_errors():
            async with pool.connection(timeout=wait) as conn:
                box = self._notices.get(conn)
                if box is not None:
                    box.clear()
                if write:
                    budget = remaining(30.0) - 0.5
                    if budget < 0.1:
                        raise DeadlineExceeded("no time left in the call's deadline to write")
                    await conn.execute("SELECT set_config('statement_timeout', %s, true)",
                                       (f"{int(budget * 1000)}ms",))
                    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
                try:
                    yield conn
                except BaseException:
                    with contextlib.suppress(Exception):
                        await conn.rollback()
                    raise
                fired = False

                async def cancel_when_late() -> None:
                    # statement_timeout does not end COMMIT's wait for the
                    # standbys; a cancel request does (Postgres then reports
                    # the commit as local-only with a WARNING).
                    nonlocal fired
                    await asyncio.sleep(max(0.05, remaining(30.0) - 0.5))
                    fired = True
                    await conn.cancel_safe(timeout=2.0)

                timer = asyncio.create_task(cancel_when_late()) if write else None
                try:
                    await conn.commit()
                except psycopg.OperationalError as e:
                    if write:
                        raise CommitUnknown(
                            "write outcome unknown: the database connection was lost during COMMIT; "
                            "retry with the same request_id") from e
                    raise
                finally:
                    if timer is not None:
                        timer.cancel()
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await timer
                    if fired:
                        # A late cancel must not hit this connection's next user.
                        await conn.close()
                if write and box and any("synchronous replication" in m for m in box):
                    raise CommitUnknown(
                        "write outcome unknown: committed on the primary but not confirmed by the "
                        "synchronous standbys before the deadline; it is not acknowledged and may be "
                        "lost on failover; retry with the same request_id")

    async def _replica_read(self, fn: Callable[[AsyncConnection[dict[str, Any]]], Awaitable[T]]) -> T:
        """Run a read on any server (standby first), then on the primary if
        no standby answers within READ_TIMEOUT (a standby may be frozen)."""
        try:
            async with asyncio.timeout(min(self.READ_TIMEOUT, max(0.1, remaining(30.0)))):
                async with self._tx(write=False, replica_ok=True) as conn:
                    return await fn(conn)
        except (TimeoutError, Unavailable):
            async with self._tx(write=False) as conn:
                return await fn(conn)

    async def ping(self) -> None:
        """The primary answers and holds the schema (a CA started before its database has none yet)."""
        async with self._tx(write=False) as conn:
            await conn.execute(SCHEMA_PROBE)

    async def ping_any(self) -> None:
        """Some server answers and holds the schema."""
        await self._replica_read(lambda conn: conn.execute(SCHEMA_PROBE))

    # ---------------------------------------------------------- idempotency

    @staticmethod
    async def _replay(conn: AsyncConnection[dict[str, Any]], request_id: RequestKey, actor: Actor,
                      action: str) -> dict[str, Any] | None:
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

    @staticmethod
    async def _remember(conn: AsyncConnection[dict[str, Any]], request_id: RequestKey, actor: Actor, action: str,
                        result: dict[str, Any]) -> None:
        if request_id.id:
            await conn.execute(
                "INSERT INTO request_log (request_id, actor, action, result) VALUES (%s, %s, %s, %s)",
                (request_id.id, actor.spiffe_id, f"{action}#{request_id.params}", json.dumps(result)))

    async def replayed(self, request_id: RequestKey, actor: Actor, action: str) -> dict[str, Any] | None:
        """The stored result of an already-applied request, if any."""
        if not request_id.id:
            return None
        async with self._tx(write=False) as conn:
            return await self._replay(conn, request_id, actor, action)

    # ---------------------------------------------------------------- audit

    @staticmethod
    async def _append_audit(
        conn: AsyncConnection[dict[str, Any]], actor: Actor, action: str, *, org_id: str = "",
        key_id: str = "", outcome: str = "ok", detail: str = "",
    ) -> int:
        cur = await conn.execute("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
        last = await cur.fetchone()
        seq = (last["seq"] + 1) if last else 1
        prev = bytes(last["hash"]) if last else auditchain.GENESIS
        rec = auditchain.AuditRecord(
            seq=seq, at=dt.datetime.now(dt.timezone.utc), actor=actor.spiffe_id, action=action,
            org_id=org_id, key_id=key_id, outcome=outcome, detail=detail[:500],
        )
        await conn.execute(
            "INSERT INTO audit_events (seq, at, actor, action, org_id, key_id, outcome, detail, prev_hash, hash)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (rec.seq, rec.at, rec.actor, rec.action, rec.org_id, rec.key_id, rec.outcome, rec.detail,
             prev, auditchain.link(prev, rec)),
        )
        return seq

    async def audit(self, actor: Actor, action: str, *, org_id: str = "", key_id: str = "",
                    outcome: str = "ok", detail: str = "") -> None:
        """Append one audit event in its own transaction (refusals, failures)."""
        async with self._tx(write=True) as conn:
            await self._append_audit(conn, actor, action, org_id=org_id, key_id=key_id,
                                     outcome=outcome, detail=detail)

    async def list_audit(self, org_id: str | None, after_seq: int, limit: int) -> list[tuple[auditchain.AuditRecord, bytes]]:
        async with self._tx(write=False) as conn:
            if org_id is None:
                cur = await conn.execute(
                    "SELECT * FROM audit_events WHERE seq > %s ORDER BY seq LIMIT %s", (after_seq, limit))
            else:
                cur = await conn.execute(
                    "SELECT * FROM audit_events WHERE seq > %s AND org_id = %s ORDER BY seq LIMIT %s",
                    (after_seq, org_id, limit))
            rows = await cur.fetchall()
        return [(self._audit_rec(r), bytes(r["hash"])) for r in rows]

    @staticmethod
    def _audit_rec(r: dict[str, Any]) -> auditchain.AuditRecord:
        return auditchain.AuditRecord(seq=r["seq"], at=r["at"], actor=r["actor"], action=r["action"],
                                      org_id=r["org_id"], key_id=r["key_id"], outcome=r["outcome"],
                                      detail=r["detail"])

    async def verify_audit(self) -> auditchain.Verdict:
        async with self._tx(write=False) as conn:
            cur = await conn.execute("SELECT * FROM audit_events ORDER BY seq")
            rows = await cur.fetchall()
        return auditchain.verify((self._audit_rec(r), bytes(r["prev_hash"]), bytes(r["hash"])) for r in rows)

    # --------------------------------------------------------------- events

    @staticmethod
    async def _emit(conn: AsyncConnection[dict[str, Any]], org_id: str, kind: str, *, key_id: str = "",
                    version: int = 0, policy_version: int = 0, audience: str = "") -> None:
        await conn.execute(
            "INSERT INTO key_events (org_id, kind, key_id, version, policy_version, audience)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (org_id, kind, key_id, version, policy_version, audience),
        )
        await conn.execute("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))

    async def events_after(self, seq: int, limit: int = 500) -> list[KeyEventRow]:
        """At most ``limit`` events after ``seq``. Every column is short and bounded (ids,
        names, numbers), so a batch is bounded in bytes too: about 200 bytes an event."""
        async def q(conn: AsyncConnection[dict[str, Any]]) -> list[KeyEventRow]:
            cur = await conn.execute("SELECT seq, org_id, kind, key_id, version, policy_version, audience, at"
                                     " FROM key_events WHERE seq > %s ORDER BY seq LIMIT %s",
                                     (seq, limit))
            return [_event(r) for r in await cur.fetchall()]
        return await self._replica_read(q)

    async def last_event_seq(self) -> int:
        async def q(conn: AsyncConnection[dict[str, Any]]) -> int:
            cur = await conn.execute("SELECT coalesce(max(seq), 0) AS s FROM key_events")
            row = await cur.fetchone()
            return int(row["s"]) if row else 0
        return await self._replica_read(q)

    async def notifications(self) -> AsyncIterator[None]:
        """Yield each time key events may have been added (LISTEN on the primary). The
        caller polls as well, with its own timer: a lost notification delays, never loses.
        (``notifies(timeout=...)`` never returned inside the CA's event loop, so no timeout here.)"""
        with _db_errors():
            extra: dict[str, Any] = {"password": self._password} if self._password is not None else {}
            conn = await AsyncConnection.connect(self._dsn, autocommit=True, **extra)
        try:
            with _db_errors():
                await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                async for _ in conn.notifies():
                    yield None
        finally:
            await conn.close()

    # ---------------------------------------------------------- organizations

    async def get_org(self, org_id: str, *, replica_ok: bool = False) -> OrgRow | None:
        async def q(conn: AsyncConnection[dict[str, Any]]) -> OrgRow | None:
            cur = await conn.execute(_ORG_SELECT, (org_id,))
            r = await cur.fetchone()
            return _org(r) if r else None
        if replica_ok:
            return await self._replica_read(q)
        async with self._tx(write=False) as conn:
            return await q(conn)

    async def create_org(self, actor: Actor, org_id: str, display_name: str, policy: Policy,
                         request_id: RequestKey = NO_REQUEST) -> OrgRow:
        async with self._tx(write=True) as conn:
            if await self._replay(conn, request_id, actor, "CreateOrganization") is not None:
                cur = await conn.execute(_ORG_SELECT, (org_id,))
                r = await cur.fetchone()
                if r is None:
                    raise NotFound(f"organization {org_id!r} not found")
                return _org(r)
            cur = await conn.execute("SELECT 1 FROM organizations WHERE org_id = %s", (org_id,))
            if await cur.fetchone():
                raise AlreadyExists(f"organization {org_id!r} exists already")
            await self._remember(conn, request_id, actor, "CreateOrganization", {"org_id": org_id})
            await conn.execute(
                "INSERT INTO organizations (org_id, display_name, policy) VALUES (%s, %s, %s)",
                (org_id, display_name, json.dumps(policy.to_json())))
            # ZENs serving the org learn its policy (networks, credential verifiers) at once.
            await self._emit(conn, org_id, "policy_changed", policy_version=1)
            await self._append_audit(conn, actor, "CreateOrganization", org_id=org_id,
                                     detail=f"private_zen_only={policy.private_zen_only}")
            cur = await conn.execute(_ORG_SELECT, (org_id,))
            r = await cur.fetchone()
        assert r is not None
        return _org(r)

    async def update_policy(self, actor: Actor, org_id: str, policy: Policy, expected_version: int,
                            request_id: RequestKey = NO_REQUEST) -> OrgRow:
        async with self._tx(write=True) as conn:
            replay = await self._replay(conn, request_id, actor, "UpdatePolicy")
            cur = await conn.execute("SELECT * FROM organizations WHERE org_id = %s FOR UPDATE", (org_id,))
            old = await cur.fetchone()
            if old is None:
                raise NotFound(f"organization {org_id!r} not found")
            if replay is not None:
                cur = await conn.execute(_ORG_SELECT, (org_id,))
                r0 = await cur.fetchone()
                assert r0 is not None
                return _org(r0)
            await self._remember(conn, request_id, actor, "UpdatePolicy", {"org_id": org_id})
            if expected_version and expected_version != old["policy_version"]:
                raise Aborted(
                    f"policy of {org_id!r} is at version {old['policy_version']}, not {expected_version}: "
                    "re-read it and apply your change again")
            new_version = old["policy_version"] + 1
            await conn.execute(
                "UPDATE organizations SET policy = %s, policy_version = %s, updated_at = now() WHERE org_id = %s",
                (json.dumps(policy.to_json()), new_version, org_id))
            was_private = bool(old["policy"].get("private_zen_only", False))
            if policy.private_zen_only and not was_private:
                # Public pools lose the org: they must drop its key now.
                await self._emit(conn, org_id, "access_revoked", audience="public")
            await self._emit(conn, org_id, "policy_changed", policy_version=new_version)
            await self._append_audit(conn, actor, "UpdatePolicy", org_id=org_id,
                                     detail=f"policy_version={new_version} private_zen_only={policy.private_zen_only}")
            # The policy just written is known: read back the rest only (re-parsing a large
            # policy's JSON would cost the event loop as much as writing it).
            cur = await conn.execute(_ORG_SELECT_WITHOUT_POLICY, (org_id,))
            r = await cur.fetchone()
        assert r is not None
        return _org({**r, "policy": None}, policy)

    # -------------------------------------------------------------- ZEN pools

    async def get_pool(self, name: str) -> PoolRow | None:
        """Replica-ok: used to authorize key distribution."""
        return await self._replica_read(lambda conn: self._pool_row(conn, name))

    @staticmethod
    async def _pool_row(conn: AsyncConnection[dict[str, Any]], name: str) -> PoolRow | None:
        cur = await conn.execute("SELECT visibility FROM zen_pools WHERE name = %s", (name,))
        r = await cur.fetchone()
        if r is None:
            return None
        cur = await conn.execute("SELECT org_id FROM zen_pool_orgs WHERE pool = %s ORDER BY org_id", (name,))
        orgs = tuple(x["org_id"] for x in await cur.fetchall())
        cur = await conn.execute(
            "SELECT EXISTS (SELECT 1 FROM organizations o WHERE o.policy->>'fail_mode' = 'closed' AND "
            "(CASE WHEN %s = 'public' THEN NOT coalesce((o.policy->>'private_zen_only')::boolean, false) "
            "ELSE o.org_id = ANY(%s) END)) AS closed", (r["visibility"], list(orgs)))
        closed = await cur.fetchone()
        return PoolRow(name=name, visibility=r["visibility"], org_ids=orgs,
                       serves_fail_closed=bool(closed and closed["closed"]))

    @staticmethod
    async def _served_ids(conn: AsyncConnection[dict[str, Any]], pool: PoolRow) -> set[str]:
        if pool.visibility == "private":
            return set(pool.org_ids)
        cur = await conn.execute("SELECT org_id FROM organizations "
                                 "WHERE NOT coalesce((policy->>'private_zen_only')::boolean, false)")
        return {r["org_id"] for r in await cur.fetchall()}

    async def orgs_served(self, pool: PoolRow) -> list[OrgRow]:
        """Every org the pool serves (replica-ok: distribution)."""
        async def q(conn: AsyncConnection[dict[str, Any]]) -> list[OrgRow]:
            if pool.visibility == "public":
                cur = await conn.execute(
                    "SELECT o.*, NULL AS active_key_id FROM organizations o "
                    "WHERE NOT coalesce((o.policy->>'private_zen_only')::boolean, false) ORDER BY o.org_id")
            else:
                cur = await conn.execute(
                    "SELECT o.*, NULL AS active_key_id FROM organizations o "
                    "WHERE o.org_id = ANY(%s) ORDER BY o.org_id", (list(pool.org_ids),))
            return [_org(r) for r in await cur.fetchall()]
        return await self._replica_read(q)

    async def list_pools(self) -> list[PoolRow]:
        async with self._tx(write=False) as conn:
            cur = await conn.execute("SELECT name FROM zen_pools ORDER BY name")
            names = [r["name"] for r in await cur.fetchall()]
            out = []
            for n in names:
                p = await self._pool_row(conn, n)
                if p:
                    out.append(p)
            return out

    async def register_pool(self, actor: Actor, name: str, visibility: str, org_ids: list[str],
                            request_id: RequestKey = NO_REQUEST) -> PoolRow:
        """Create or update a pool. A change of visibility or of bound orgs
        revokes, in the same transaction, every org the pool no longer serves
        (its ZENs drop those keys on the ACCESS_REVOKED event). The operator
        moves a pool's pods to dedicated nodes *before* registering it private."""
        async with self._tx(write=True) as conn:
            old = await self._pool_row(conn, name)
            if old is not None and await self._replay(conn, request_id, actor, "RegisterZenPool") is not None:
                return old
            await self._remember(conn, request_id, actor, "RegisterZenPool", {"pool": name})
            if org_ids:
                cur = await conn.execute("SELECT org_id FROM organizations WHERE org_id = ANY(%s)", (org_ids,))
                known = {r["org_id"] for r in await cur.fetchall()}
                unknown = sorted(set(org_ids) - known)
                if unknown:
                    raise NotFound(f"organization(s) not found: {', '.join(unknown)}")
            before = await self._served_ids(conn, old) if old else set()
            if old is None:
                await conn.execute("INSERT INTO zen_pools (name, visibility) VALUES (%s, %s)", (name, visibility))
            else:
                await conn.execute("UPDATE zen_pools SET visibility = %s, updated_at = now() WHERE name = %s",
                                   (visibility, name))
            await conn.execute("DELETE FROM zen_pool_orgs WHERE pool = %s", (name,))
            for o in sorted(set(org_ids)):
                await conn.execute("INSERT INTO zen_pool_orgs (pool, org_id) VALUES (%s, %s)", (name, o))
            row = await self._pool_row(conn, name)
            assert row is not None
            for o in sorted(before - await self._served_ids(conn, row)):
                await self._emit(conn, o, "access_revoked", audience=f"pool:{name}")
            change = f" (was {old.visibility})" if old and old.visibility != visibility else ""
            await self._append_audit(conn, actor, "RegisterZenPool",
                                     detail=f"pool={name} visibility={visibility}{change} "
                                            f"orgs={','.join(sorted(set(org_ids)))}")
        return row

    async def deregister_pool(self, actor: Actor, name: str, request_id: RequestKey = NO_REQUEST) -> PoolRow:
        """Delete a pool; every org it served gets ACCESS_REVOKED for it."""
        async with self._tx(write=True) as conn:
            old = await self._pool_row(conn, name)
            if old is None:
                done = await self._replay(conn, request_id, actor, "DeregisterZenPool")
                if done is not None:  # a retry of a deregistration that did commit
                    return PoolRow(name=name, visibility=done["visibility"], org_ids=tuple(done["org_ids"]))
                raise NotFound(f"ZEN pool {name!r} is not registered")
            await self._remember(conn, request_id, actor, "DeregisterZenPool",
                                 {"pool": name, "visibility": old.visibility, "org_ids": list(old.org_ids)})
            for o in sorted(await self._served_ids(conn, old)):
                await self._emit(conn, o, "access_revoked", audience=f"pool:{name}")
            await conn.execute("DELETE FROM zen_pools WHERE name = %s", (name,))
            await self._append_audit(conn, actor, "DeregisterZenPool", detail=f"pool={name} visibility={old.visibility}")
        return old

    # ---------------------------------------------------------- intermediates

    async def add_pending_key(self, actor: Actor, pending: PendingKey, request_id: RequestKey = NO_REQUEST) -> dict[str, Any]:
        """Store a new sealed pending key; a previous pending key is discarded.
        Returns the request's result (the stored one, for a replayed request)."""
        result = {"key_id": pending.key_id, "csr_pem": pending.csr_pem, "algorithm": pending.algorithm.value,
                  "spki_sha256": pending.spki_sha256.hex()}
        async with self._tx(write=True) as conn:
            replay = await self._replay(conn, request_id, actor, "RequestIntermediateCsr")
            if replay is not None:
                return replay
            await self._remember(conn, request_id, actor, "RequestIntermediateCsr", result)
            cur = await conn.execute("SELECT 1 FROM organizations WHERE org_id = %s", (pending.org_id,))
            if not await cur.fetchone():
                raise NotFound(f"organization {pending.org_id!r} not found")
            cur = await conn.execute(
                "DELETE FROM intermediate_keys WHERE org_id = %s AND state = 'pending' RETURNING *",
                (pending.org_id,))
            for old in await cur.fetchall():
                await self._tombstone(conn, old, "discarded", "replaced by a newer CSR")
                self.on_retire()
            await conn.execute(
                "INSERT INTO intermediate_keys (key_id, org_id, state, algorithm, keylib_format, spki_sha256, sealed_key)"
                " VALUES (%s, %s, 'pending', %s, %s, %s, %s)",
                (pending.key_id, pending.org_id, pending.algorithm.value, pending.keylib_format,
                 pending.spki_sha256, pending.sealed))
            await self._append_audit(conn, actor, "RequestIntermediateCsr", org_id=pending.org_id,
                                     key_id=pending.key_id, detail=f"algorithm={pending.algorithm.value}")
        return result

    @staticmethod
    async def _tombstone(conn: AsyncConnection[dict[str, Any]], r: dict[str, Any], state: str, reason: str) -> None:
        await conn.execute(
            "INSERT INTO intermediate_history (key_id, org_id, state, version, algorithm, spki_sha256, subject,"
            " serial_hex, not_before, not_after, created_at, activated_at, reason)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (r["key_id"], r["org_id"], state, r["version"], r["algorithm"], r["spki_sha256"], r["subject"],
             r["serial_hex"], r["not_before"], r["not_after"], r["created_at"], r["activated_at"], reason[:200]))

    async def activate(
        self,
        actor: Actor,
        org_id: str,
        validate: Callable[[bytes], tuple[CertInfo, str, str]],
        request_id: RequestKey = NO_REQUEST,
    ) -> IntermediateRow:
        """Activate the org's pending key with a certificate ``validate`` accepts.

        ``validate(pending_spki_sha256)`` runs inside the transaction and
        returns (info, certificate_pem, chain_pem) or raises. The previous
        active key and certificate are deleted in the same transaction.
        """
        async with self._tx(write=True) as conn:
            cur = await conn.execute("SELECT * FROM organizations WHERE org_id = %s FOR UPDATE", (org_id,))
            org = await cur.fetchone()
            if org is None:
                raise NotFound(f"organization {org_id!r} not found")
            replay = await self._replay(conn, request_id, actor, "UploadIntermediateCertificate")
            if replay is not None:
                return await self._intermediate(conn, org_id, replay["key_id"])
            cur = await conn.execute(
                "SELECT * FROM intermediate_keys WHERE org_id = %s AND state = 'pending' FOR UPDATE", (org_id,))
            pending = await cur.fetchone()
            if pending is None:
                raise FailedPrecondition(
                    f"organization {org_id!r} has no pending key: call RequestIntermediateCsr, "
                    "sign its CSR, then upload the certificate")
            ci, cert_pem, chain_pem = validate(bytes(pending["spki_sha256"]))
            cur = await conn.execute(
                "DELETE FROM intermediate_keys WHERE org_id = %s AND state = 'active' RETURNING *", (org_id,))
            retired = await cur.fetchall()
            for old in retired:
                await self._tombstone(conn, old, "rotated", f"replaced by {pending['key_id']}")
                self.on_retire()
            version = org["key_version"] + 1
            await conn.execute("UPDATE organizations SET key_version = %s, updated_at = now() WHERE org_id = %s",
                               (version, org_id))
            cur = await conn.execute(
                "UPDATE intermediate_keys SET state = 'active', version = %s, certificate_pem = %s, chain_pem = %s,"
                " subject = %s, serial_hex = %s, not_before = %s, not_after = %s, activated_at = now()"
                " WHERE key_id = %s RETURNING *, NULL::timestamptz AS ended_at",
                (version, cert_pem, chain_pem, ci.subject, ci.serial_hex, ci.not_before, ci.not_after,
                 pending["key_id"]))
            row = await cur.fetchone()
            assert row is not None
            key_id = str(pending["key_id"])
            await self._remember(conn, request_id, actor, "UploadIntermediateCertificate", {"key_id": key_id})
            await self._emit(conn, org_id, "rotated", key_id=key_id, version=version)
            detail = f"version={version} serial={ci.serial_hex}"
            if retired:
                detail += " retired=" + ",".join(str(r["key_id"]) for r in retired)
            await self._append_audit(conn, actor, "UploadIntermediateCertificate", org_id=org_id,
                                     key_id=key_id, detail=detail)
        return _inter(row)

    async def revoke(self, actor: Actor, org_id: str, key_id: str, reason: str,
                     request_id: RequestKey = NO_REQUEST) -> IntermediateRow:
        async with self._tx(write=True) as conn:
            if await self._replay(conn, request_id, actor, "RevokeIntermediate") is not None:
                return await self._intermediate(conn, org_id, key_id)
            await self._remember(conn, request_id, actor, "RevokeIntermediate", {"key_id": key_id})
            cur = await conn.execute(
                "DELETE FROM intermediate_keys WHERE org_id = %s AND key_id = %s RETURNING *",
                (org_id, key_id))
            r = await cur.fetchone()
            if r is None:
                cur = await conn.execute(
                    "SELECT state FROM intermediate_history WHERE org_id = %s AND key_id = %s", (org_id, key_id))
                h = await cur.fetchone()
                if h:
                    raise FailedPrecondition(f"key {key_id} is already {h['state']}; nothing to revoke")
                raise NotFound(f"key {key_id} not found in organization {org_id!r}")
            state = "revoked" if r["state"] == "active" else "discarded"
            await self._tombstone(conn, r, state, reason or "revoked by admin")
            self.on_retire()
            if r["state"] == "active":
                await self._emit(conn, org_id, "revoked", key_id=key_id, version=r["version"] or 0)
            await self._append_audit(conn, actor, "RevokeIntermediate", org_id=org_id, key_id=key_id,
                                     detail=f"was={r['state']} reason={reason[:100]}")
            cur = await conn.execute("SELECT * FROM intermediate_history WHERE key_id = %s", (key_id,))
            t = await cur.fetchone()
        assert t is not None
        return _inter(t)

    @staticmethod
    async def _intermediate(conn: AsyncConnection[dict[str, Any]], org_id: str, key_id: str) -> IntermediateRow:
        for q in ("SELECT *, NULL::timestamptz AS ended_at FROM intermediate_keys WHERE org_id = %s AND key_id = %s",
                  "SELECT * FROM intermediate_history WHERE org_id = %s AND key_id = %s"):
            cur = await conn.execute(q, (org_id, key_id))
            r = await cur.fetchone()
            if r is not None:
                return _inter(r)
        raise NotFound(f"key {key_id} not found in organization {org_id!r}")

    async def list_intermediates(self, org_id: str) -> list[IntermediateRow]:
        async with self._tx(write=False) as conn:
            cur = await conn.execute(
                "SELECT key_id, org_id, state, version, algorithm, spki_sha256, subject, serial_hex, not_before,"
                " not_after, created_at, activated_at, NULL::timestamptz AS ended_at FROM intermediate_keys"
                " WHERE org_id = %s"
                " UNION ALL SELECT key_id, org_id, state, version, algorithm, spki_sha256, subject, serial_hex,"
                " not_before, not_after, created_at, activated_at, ended_at FROM intermediate_history"
                " WHERE org_id = %s ORDER BY created_at DESC", (org_id, org_id))
            return [_inter(r) for r in await cur.fetchall()]

    async def distribution_view(self, pool_name: str, org_id: str, *, replica_ok: bool = True
                                ) -> tuple[PoolRow | None, OrgRow | None, ActiveKey | None]:
        """The pool, the org and its active key from ONE snapshot, so a key is
        never sent on the strength of a pool binding that a concurrent change
        has just removed."""
        box: dict[str, PoolRow | None] = {}

        async def pool_q(conn: AsyncConnection[dict[str, Any]]) -> None:
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            box["pool"] = await self._pool_row(conn, pool_name)

        org, key = await self.active_key(org_id, replica_ok=replica_ok, before=pool_q)
        return box.get("pool"), org, key

    async def active_key(self, org_id: str, *, replica_ok: bool = True,
                         before: Callable[[AsyncConnection[dict[str, Any]]], Awaitable[None]] | None = None,
                         ) -> tuple[OrgRow | None, ActiveKey | None]:
        """The org and its active key. Replica-ok by default (distribution);
        the caller guards against a lagging standby by key version."""
        async def q(conn: AsyncConnection[dict[str, Any]]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
            if before is not None:
                await before(conn)
            cur = await conn.execute(_ORG_SELECT, (org_id,))
            o = await cur.fetchone()
            if o is None:
                return None, None
            cur = await conn.execute(
                "SELECT * FROM intermediate_keys WHERE org_id = %s AND state = 'active'", (org_id,))
            return o, await cur.fetchone()
        if replica_ok:
            o, k = await self._replica_read(q)
        else:
            async with self._tx(write=False) as conn:
                o, k = await q(conn)
        if o is None:
            return None, None
        org = _org(o)
        if k is None:
            return org, None
        return org, ActiveKey(
            org=org, key_id=str(k["key_id"]), version=k["version"], algorithm=KeyAlgorithm(k["algorithm"]),
            keylib_format=k["keylib_format"], spki_sha256=bytes(k["spki_sha256"]),
            sealed_key=bytes(k["sealed_key"]), certificate_pem=k["certificate_pem"],
            chain_pem=k["chain_pem"] or "", not_after=k["not_after"])


    # ------------------------------------------------------ retired keys' WAL

    STEP_WAIT = 10.0
    """Seconds one wait for a standby may take (within the clean-up's budget)."""

    async def forget_retired_wal(self, budget: float = 60.0) -> list[str]:
        """Remove the WAL that carried retired keys from every server's pg_wal.

        A deleted row's bytes stay in WAL until a checkpoint removes the segment,
        and a standby removes WAL only at its own restartpoint. On the primary:
        wait for running CA writes to end (a retirement notifies from inside its
        transaction; the write lock is the barrier), VACUUM ``intermediate_keys``
        (so no later full-page image copies a dead row into new WAL), switch WAL
        segments, wait for each connected standby's slot to pass the switch, then
        CHECKPOINT: older segments are removed. Then on every standby the DSN
        lists: wait until it has replayed that checkpoint, and CHECKPOINT there
        too (a restartpoint: its older segments are removed). The CA's role needs
        ``pg_checkpoint`` (PostgreSQL 15+) and EXECUTE on ``pg_switch_wal()``.

        Every wait is bounded by ``budget`` (a standby's by :attr:`STEP_WAIT`).
        Returns the problems met (an unreachable or lagging standby, an inactive
        slot); raises :class:`Unavailable` when the primary cannot be cleaned.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        problems: list[str] = []

        async def bounded(c: AsyncConnection[Any]) -> None:
            ms = int(max(0.1, deadline - loop.time()) * 1000)
            await c.execute("SELECT set_config('statement_timeout', %s, false)", (f"{ms}ms",))

        async def until(c: AsyncConnection[Any], sql: str, lsn: str, wait: float) -> bool:
            end = min(deadline, loop.time() + wait)
            while True:
                row = await (await c.execute(sql, (lsn,))).fetchone()
                if row is not None and row[0]:
                    return True
                if loop.time() >= end:
                    return False
                await asyncio.sleep(0.05)  # poll interval of a bounded wait

        def why(e: BaseException) -> str:  # Postgres' own words (no bind values: none are sent)
            return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]

        try:
            async with await AsyncConnection.connect(self._dsn, autocommit=True, password=self._password) as c:
                await bounded(c)
                await c.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))  # released at once
                await c.execute("VACUUM intermediate_keys")
                await c.execute("SELECT pg_switch_wal()")
                # The end of the padded segment (pg_switch_wal() returns the switch record's end,
                # inside it): a slot short of it still holds the old segment.
                row = await (await c.execute("SELECT pg_current_wal_lsn()::text")).fetchone()
                assert row is not None
                if not await until(c, "SELECT NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE active"
                                      " AND (restart_lsn IS NULL OR restart_lsn < %s::pg_lsn))", row[0],
                                   self.STEP_WAIT):
                    problems.append("a standby's replication slot did not pass the WAL switch in time: "
                                    "the primary keeps the old segment until a later checkpoint")
                cur = await c.execute("SELECT slot_name FROM pg_replication_slots WHERE NOT active"
                                      " AND restart_lsn < %s::pg_lsn", (row[0],))
                for (slot,) in await cur.fetchall():
                    problems.append(f"replication slot {slot} is inactive: the primary keeps the WAL it holds "
                                    "(with retired keys' bytes) until its standby is back")
                await c.execute("CHECKPOINT")
                row = await (await c.execute("SELECT pg_current_wal_lsn()::text")).fetchone()
                assert row is not None
                target = str(row[0])
        except psycopg.Error as e:
            raise Unavailable(f"primary: {why(e)}") from e
        for label, conninfo in self._each_server(self._dsn):
            try:
                # Client-side too: a frozen server enforces no statement_timeout.
                async with asyncio.timeout(max(0.1, min(deadline - loop.time(), self.STEP_WAIT + 5))):
                    async with await AsyncConnection.connect(conninfo, autocommit=True,
                                                             password=self._password) as s:
                        await bounded(s)
                        row = await (await s.execute("SELECT pg_is_in_recovery()")).fetchone()
                        if row is None or not row[0]:
                            continue  # the primary, done above
                        if not await until(s, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", target,
                                           self.STEP_WAIT):
                            problems.append(f"standby {label} did not replay up to {target} in time: its pg_wal "
                                            "keeps retired keys' bytes until its next restartpoint")
                            continue
                        await s.execute("CHECKPOINT")  # a restartpoint
            except (psycopg.Error, TimeoutError) as e:
                problems.append(f"server {label}: {why(e) if isinstance(e, psycopg.Error) else 'no answer in time'}"
                                ": if a standby, its pg_wal keeps retired keys' bytes until its next restartpoint")
        return problems

    @staticmethod
    def _each_server(dsn: str) -> list[tuple[str, str]]:
        """(host:port, a DSN naming that server alone) for each server of a multi-host DSN."""
        params = {k: str(v) for k, v in conninfo_to_dict(dsn).items()
                  if v is not None and k not in ("target_session_attrs", "load_balance_hosts")}
        lists = {k: params.pop(k).split(",") for k in ("host", "hostaddr", "port") if k in params}
        out: list[tuple[str, str]] = []
        for i in range(max((len(v) for v in lists.values()), default=1)):
            one: dict[str, str] = {**params, **{k: v[min(i, len(v) - 1)] for k, v in lists.items()}}
            label = f"{one.get('host') or one.get('hostaddr') or 'local'}:{one.get('port') or '5432'}"
            out.append((label, make_conninfo("", **one)))
        return out
