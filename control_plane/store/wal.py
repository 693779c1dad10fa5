"""Forgetting retired keys' WAL on every server of the cluster.

Contract: :meth:`Wal.forget_retired_wal` removes, within its budget, the WAL
segments that carried retired keys from the primary's and each standby's
pg_wal, and reports what it could not do; it raises :class:`Unavailable`
only when the primary cannot be cleaned. It connects on its own (autocommit:
VACUUM and CHECKPOINT run outside transactions), never through the pools.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from control_plane.errors import Unavailable
from control_plane.store.tx import WRITE_LOCK, Database


class Wal(Database):
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
                await c.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))  # released at once
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
