"""Transactions and replica reads over the HA cluster: the one place a connection is taken.

Contract
--------
* A ``rw`` pool over the multi-host DSN (target_session_attrs=read-write) for
  every write and for the reads that decide one, and one pool per server the
  DSN lists (:class:`Server`, any role) for key-distribution reads
  (:meth:`Database._replica_read`): standbys first, then the primary, so ZENs
  keep getting keys while the primary is down and admin writes never land on
  a standby.
* A replica read is answered by the first server that answers within the
  call's deadline: a server with no answer within :data:`HEDGE_SECONDS` gets
  company (the next server is asked too), a server that failed or was late
  goes last for :data:`SLOW_SECONDS`, and an attempt no longer waited for is
  abandoned (:meth:`Database._abandon`), never waited out: psycopg ends a
  cancelled query only once the server confirms it, seconds after the
  deadline when the server is frozen or cut off.
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
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
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

HEDGE_SECONDS = 0.5
"""A replica read a server has not answered within this (a healthy one answers in milliseconds) is
asked of the next server too; the first answer wins."""
SLOW_SECONDS = 10.0
"""A server that failed a read, or did not answer it within HEDGE_SECONDS, is asked last for this
long (or until it answers again): the reads that follow do not each wait for a frozen server."""

FRESH_SECONDS = 2.0
"""A pooled connection used without error this recently is handed out unchecked: the check (an empty
query) is a round trip per transaction, as much as a key read's own under load. One that broke since
fails its read, and the read goes on to the next server (a write is retried by its caller)."""

RECONNECT_SECONDS = 5.0
"""A pool that cannot connect retries with psycopg_pool's back-off (1 s, then 2 s) for this long,
then gives up and connects again on the next request. Its default (5 minutes) lets the back-off grow
to a minute between attempts: a server that came back (Postgres started after the CA, as pods do; a
standby rejoined) went unused that long, and reads failed while it answered."""

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


@dataclass(eq=False)
class Server:
    """One server of the cluster, as replica reads see it: a pool of its own and what its
    connections last told of it."""

    name: str
    """host:port, as the DSN lists it."""
    pool: AsyncConnectionPool[Any] = field(init=False)
    standby: bool | None = None
    """As the server last reported it (``in_hot_standby``, which Postgres reports again on the first
    query after a promotion); None until a connection was made."""
    slow_until: float = 0.0
    """time.monotonic() until which the server is asked last (SLOW_SECONDS)."""

    def saw(self, conn: AsyncConnection[Any]) -> None:
        hot = conn.info.parameter_status("in_hot_standby")
        if hot is not None:
            self.standby = hot == "on"

    def rank(self, now: float) -> tuple[bool, bool]:
        """Sort key: servers not slow first, then standbys (or not known yet) before the primary;
        the DSN's order within each."""
        return self.slow_until > now, self.standby is False


class Database:
    """The connection pools and the transactions over them. Create with
    :meth:`open`, release with :meth:`close`."""

    def __init__(self, dsn: str, rw: AsyncConnectionPool[Any], servers: list[Server]) -> None:
        self._dsn = dsn
        self._rw = rw
        self._servers = servers
        self._abandoned: set[asyncio.Task[Any]] = set()
        self._notices: weakref.WeakKeyDictionary[Any, list[str]] = weakref.WeakKeyDictionary()
        self._fresh: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        """When each connection last ended a transaction without error (FRESH_SECONDS)."""
        self._pool_timeout = 5.0
        self._password: str | None = None
        self.on_retire: Callable[[], None] = lambda: None
        """Called inside a transaction that deletes a sealed key (must not block or raise):
        the CA wires it to its background WAL clean-up (:meth:`forget_retired_wal`)."""

    @staticmethod
    def derive_dsns(dsn: str) -> tuple[str, list[tuple[str, str]]]:
        """(read-write DSN, [(name, DSN) of each server it lists]) from the configured DSN."""
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
        return rw, [(name, make_conninfo("", **one)) for name, one in _each_server(params)]

    @classmethod
    async def open(cls, dsn: str, *, max_size: int = 8, timeout: float = 5.0, wait: bool = True,
                   password: str | None = None) -> Self:
        """``password``, when given, goes to libpq beside the DSN (never into it): read from a file
        of any mode, where a libpq passfile must be 0600 (a Secret volume with fsGroup is 0440)."""
        rw_dsn, server_dsns = cls.derive_dsns(dsn)
        notices: weakref.WeakKeyDictionary[Any, list[str]] = weakref.WeakKeyDictionary()
        fresh: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()

        async def check(conn: AsyncConnection[Any]) -> None:
            if time.monotonic() - fresh.get(conn, 0.0) >= FRESH_SECONDS:
                await AsyncConnectionPool.check_connection(conn)

        def pool(conninfo: str, name: str, server: Server | None = None) -> AsyncConnectionPool[Any]:
            async def configure(conn: AsyncConnection[Any]) -> None:
                box: list[str] = []
                notices[conn] = box
                conn.add_notice_handler(lambda d: box.append(d.message_primary or ""))
                if server is not None:
                    server.saw(conn)

            return AsyncConnectionPool(
                conninfo, min_size=1, max_size=max_size, timeout=timeout, open=False,
                reconnect_timeout=RECONNECT_SECONDS,
                kwargs={"row_factory": dict_row, "autocommit": False,
                        **({"password": password} if password is not None else {})}, configure=configure,
                check=check, name=name)

        rw = pool(rw_dsn, "keyward-ca-rw")
        servers = []
        for i, (name, server_dsn) in enumerate(server_dsns):
            srv = Server(name)
            srv.pool = pool(server_dsn, f"keyward-ca-read-{i}", srv)
            servers.append(srv)
        with db_errors():
            await rw.open(wait=wait, timeout=timeout)
            for srv in servers:
                await srv.pool.open(wait=False)
        store = cls(rw_dsn, rw, servers)
        store._notices = notices
        store._fresh = fresh
        store._pool_timeout = timeout
        store._password = password
        return store

    async def close(self) -> None:
        for srv in self._servers:
            await srv.pool.close()
        await self._rw.close()

    async def migrate(self) -> None:
        async with self._tx(write=True) as conn:
            await conn.execute(SCHEMA.encode())

    @asynccontextmanager
    async def _tx(self, *, write: bool, pool: AsyncConnectionPool[Any] | None = None,
                  one_statement: bool = False) -> AsyncIterator[Conn]:
        """One transaction, on the primary or on ``pool`` (a :class:`Server`'s); ``one_statement``
        (a read that runs a single statement, its own snapshot): in autocommit, with no BEGIN and
        COMMIT round trips. Writes take the
        write lock, are bounded by the call's deadline (statement_timeout covers the wait for the
        standbys), and raise :class:`CommitUnknown` when Postgres committed locally but the
        standbys' confirmation was cancelled, or the server went away during COMMIT: such a write
        is NOT acknowledged."""
        pool = pool or self._rw
        # Waiting for a connection is bounded by the call's deadline too, so a
        # missing primary is answered UNAVAILABLE in time, not by the client's timeout.
        wait = max(0.1, min(self._pool_timeout, remaining(self._pool_timeout) - 0.3))
        with db_errors():
            async with pool.connection(timeout=wait) as conn:
                if one_statement and not write:
                    await conn.set_autocommit(True)  # no round trip: the connection is idle
                elif conn.autocommit:
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
                self._fresh[conn] = time.monotonic()
                if write and box and any("synchronous replication" in m for m in box):
                    raise CommitUnknown(
                        "write outcome unknown: committed on the primary but not confirmed by the "
                        "synchronous standbys before the deadline; it is not acknowledged and may be "
                        "lost on failover; retry with the same request_id")

    def _abandon(self, task: asyncio.Task[Any]) -> None:
        """Cancel ``task`` and let it end by itself. psycopg ends a cancelled query only once the
        server has answered its cancel request (or 5 s later) and the query has ended (or 5 s
        later), then closes the connection, which its pool replaces: waiting for that is what
        made key reads outlive the ZEN's deadline with a frozen or cut-off server."""
        task.cancel()
        self._abandoned.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._abandoned.discard(task)
        if not task.cancelled():
            task.exception()  # nobody waits for an abandoned task: its failure is expected

    async def bounded(self, aw: Coroutine[Any, Any, T], seconds: float) -> T:
        """``aw`` (a call of this store) given at most ``seconds``, then abandoned
        (:meth:`_abandon`: not waited for, where ``asyncio.timeout`` would wait for the cancelled
        query to end): TimeoutError. What it was doing may still happen (a write may commit)."""
        if seconds <= 0:
            aw.close()
            raise TimeoutError
        task = asyncio.create_task(aw)
        try:
            done, _ = await asyncio.wait({task}, timeout=seconds)
        finally:
            if not task.done():  # late, or our caller was cancelled
                self._abandon(task)
        if not done:
            raise TimeoutError
        return task.result()

    async def _attempt(self, srv: Server, fn: Callable[[Conn], Awaitable[T]], one_statement: bool
                       ) -> tuple[T, bool]:
        """``fn`` on ``srv``: (its answer, whether the server answered as the primary)."""
        async with self._tx(write=False, pool=srv.pool, one_statement=one_statement) as conn:
            value = await fn(conn)
            srv.saw(conn)
        srv.slow_until = 0.0
        return value, srv.standby is False

    async def _replica_read(self, fn: Callable[[Conn], Awaitable[T]],
                            accept: Callable[[T], bool] | None = None, *, one_statement: bool = False) -> T:
        """``fn`` on the servers, standbys first, each asked once (see the module's contract):
        the first answer ``accept`` takes (any, without it), else the primary's (no server holds a
        newer one). Bounded by the call's deadline: Unavailable when no server answered in time,
        or only standbys behind what ``accept`` needs."""
        ends = time.monotonic() + remaining(30.0)
        if ends - time.monotonic() < 0.05:
            raise DeadlineExceeded("no time left in the call's deadline to read")
        order = sorted(self._servers, key=lambda s: s.rank(time.monotonic()))
        running: dict[asyncio.Task[tuple[T, bool]], tuple[Server, float]] = {}
        behind = 0
        failure: KeywardError | None = None
        try:
            while order or running:
                now = time.monotonic()
                if order:  # the next server: the first, or company for late ones, or a stand-in
                    srv = order.pop(0)
                    running[asyncio.create_task(self._attempt(srv, fn, one_statement))] = (srv, now)
                left = ends - now
                if left <= 0:
                    break
                done, _ = await asyncio.wait(running, timeout=min(HEDGE_SECONDS, left) if order else left,
                                             return_when=asyncio.FIRST_COMPLETED)
                now = time.monotonic()
                for task, (srv, _) in [(t, running.pop(t)) for t in done]:
                    err = task.exception()
                    if err is None:
                        value, primary = task.result()
                        if primary or accept is None or accept(value):
                            return value
                        behind += 1  # a standby behind: the next server, at once
                    elif isinstance(err, KeywardError):
                        srv.slow_until = now + SLOW_SECONDS
                        failure = err
                    else:
                        raise err
                self._late(running, now)
        finally:
            self._late(running, time.monotonic())
            for task in running:
                self._abandon(task)
        if behind:
            raise Unavailable("database unavailable: the standbys that answered are behind what was already "
                              "read, and no primary answered in time; retry later")
        if failure is not None and not running:
            raise failure
        raise Unavailable("database unavailable: no server answered within the call's deadline; retry later")

    @staticmethod
    def _late(running: dict[asyncio.Task[Any], tuple[Server, float]], now: float) -> None:
        for srv, started in running.values():
            if now - started >= HEDGE_SECONDS:
                srv.slow_until = now + SLOW_SECONDS

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


def _each_server(params: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(host:port, connection parameters) of each server a multi-host DSN lists, by libpq's rules
    (``host`` and ``hostaddr`` name one server an entry, ``port`` gives one for all or one each),
    each to be taken in any role."""
    lists = {k: str(params[k]).split(",") for k in ("host", "hostaddr", "port") if params.get(k)}
    n = max((len(v) for k, v in lists.items() if k != "port"), default=1)
    out = []
    for i in range(n):
        one = {k: v for k, v in params.items() if k not in ("target_session_attrs", "load_balance_hosts")}
        for k, v in lists.items():
            if len(v) not in (1, n):
                raise ConfigError(f"KEYWARD_DB_DSN lists {n} servers but {len(v)} {k} values")
            one[k] = v[i] if len(v) == n else v[0]
        out.append((f"{one.get('host') or one.get('hostaddr') or 'localhost'}:{one.get('port') or 5432}", one))
    return out
