"""Transactions and replica reads over the HA cluster: the one place a connection is taken.

Contract
--------
* Two pools over the same multi-host DSN: ``rw`` (target_session_attrs=
  read-write) for every write and for the reads that decide one; ``ro``
  (prefer-standby) for key-distribution reads (:meth:`Database._replica_read`),
  which fall back to ``rw`` when no standby answers within READ_TIMEOUT, so
  ZENs keep getting keys while the primary is down and admin writes never land
  on a standby.
* A write transaction (:meth:`Database._tx` with ``write=True``) first takes one
  advisory lock, :data:`WRITE_LOCK`. Admin writes are rare; serializing them
  makes the audit chain and the key-event sequence strictly ordered by commit,
  so a watcher reading ``seq > last`` never skips a row. It is bounded by the
  call's deadline (statement_timeout; a cancel request for COMMIT's wait for
  the standbys) and raises :class:`CommitUnknown` when Postgres committed
  locally but the standbys' confirmation was cancelled, or the server went
  away during COMMIT: such a write is NOT acknowledged.
* Library errors become :mod:`control_plane.errors` classes (:func:`db_errors`):
  an unreachable database is :class:`Unavailable`, a duplicate is
  :class:`AlreadyExists`.
* The schema is ``schema.sql`` beside this module, applied whole by
  :meth:`Database.migrate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from importlib import resources
from typing import Any, Self, TypeAlias, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from control_plane.deadline import remaining
from control_plane.errors import (
    AlreadyExists,
    CommitUnknown,
    ConfigError,
    DeadlineExceeded,
    FailedPrecondition,
    KeywardError,
    Unavailable,
)

T = TypeVar("T")
Conn: TypeAlias = AsyncConnection[dict[str, Any]]

WRITE_LOCK = 0x6B657977  # "keyw": one advisory lock serializes CA writes

# Answers only where the whole schema exists (its last table): what "ready" needs.
SCHEMA_PROBE = "SELECT 1 FROM audit_events LIMIT 0"
SCHEMA = resources.files(__package__).joinpath("schema.sql").read_text(encoding="utf-8")


@contextmanager
def db_errors() -> Iterator[None]:
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


class Database:
    """The connection pools and the transactions over them. Create with
    :meth:`open`, release with :meth:`close`."""

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
        # A server cut off (a link down, a machine gone) answers nothing, not even a reset: without
        # these a pooled connection to it, or the pool's check of one, waits out the kernel's
        # retransmissions (minutes). Unsent-data and idle probes end it in seconds; a commit that
        # waits for its standbys is neither (the server acknowledged the bytes).
        for k, v in (("keepalives", "1"), ("keepalives_idle", "5"), ("keepalives_interval", "2"),
                     ("keepalives_count", "2"), ("tcp_user_timeout", "5000")):
            params.setdefault(k, v)
        rw = make_conninfo("", **{**params, "target_session_attrs": "read-write"})
        ro = make_conninfo("", **{**params, "target_session_attrs": "prefer-standby"})
        return rw, ro

    @classmethod
    async def open(cls, dsn: str, *, max_size: int = 8, timeout: float = 5.0, wait: bool = True,
                   password: str | None = None) -> Self:
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
        with db_errors():
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
            await conn.execute(SCHEMA.encode())

    @asynccontextmanager
    async def _tx(self, *, write: bool, replica_ok: bool = False) -> AsyncIterator[Conn]:
        """One transaction. Writes take the write lock, are bounded by the
        call's deadline (statement_timeout covers the wait for the standbys),
        and raise :class:`CommitUnknown` when Postgres committed locally but
        the standbys' confirmation was cancelled, or the server went away
        during COMMIT: such a write is NOT acknowledged."""
        pool = self._ro if replica_ok else self._rw
        # Waiting for a connection is bounded by the call's deadline too, so a
        # missing primary is answered UNAVAILABLE in time, not by the client's timeout.
        wait = max(0.1, min(self._pool_timeout, remaining(self._pool_timeout) - 0.3))
        with db_errors():
            async with pool.connection(timeout=wait) as conn:
                if conn.autocommit:
                    # psycopg_pool's check (check_connection) turns autocommit on for its probe and
                    # off again; a cancellation at the wrong moment returns the connection with it
                    # on (set_autocommit may yield to the loop once it has set it). In autocommit
                    # every statement is a transaction of its own: the write lock would be let go
                    # at once and an action and its audit row no longer commit together.
                    await conn.set_autocommit(False)
                box = self._notices.get(conn)
                if box is not None:
                    box.clear()
                if write:
                    budget = remaining(30.0) - 0.5
                    if budget < 0.1:
                        raise DeadlineExceeded("no time left in the call's deadline to write")
                    await conn.execute("SELECT set_config('statement_timeout', %s, true)",
                                       (f"{int(budget * 1000)}ms",))
                    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
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

    async def _replica_read(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """Run a read on any server (standby first), then on the primary if
        no standby answers within READ_TIMEOUT (a standby may be frozen)."""
        try:
            async with asyncio.timeout(min(self.READ_TIMEOUT, max(0.1, remaining(30.0)))):
                async with self._tx(write=False, replica_ok=True) as conn:
                    return await fn(conn)
        except (TimeoutError, Unavailable):
            async with self._tx(write=False) as conn:
                return await fn(conn)

    async def _read(self, fn: Callable[[Conn], Awaitable[T]], *, replica_ok: bool) -> T:
        """``fn`` on a standby (:meth:`_replica_read`) or, when not ``replica_ok``, on the primary."""
        if replica_ok:
            return await self._replica_read(fn)
        async with self._tx(write=False) as conn:
            return await fn(conn)

    async def ping(self) -> None:
        """The primary answers and holds the schema (a CA started before its database has none yet)."""
        async with self._tx(write=False) as conn:
            await conn.execute(SCHEMA_PROBE)

    async def ping_any(self) -> None:
        """Some server answers and holds the schema."""
        await self._replica_read(lambda conn: conn.execute(SCHEMA_PROBE))
