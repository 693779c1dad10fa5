"""The store's pools against a server that comes up late (control_plane/store/tx.py).

A server absent for a while and then back is used on the next read: found by CI's e2e, where the
chart's Postgres pods started some 20 s after the CA, whose per-server read pools had by then
backed off (psycopg_pool's default: 1, 2, 4, 8, 16 s... for 5 minutes), so the event hub's reads
failed for half a minute while every server answered.

The server is the session's real Postgres behind a TCP forwarder on a port of its own: nothing
listens there until the test starts the forwarder (connection refused, as for a pod not started).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from control_plane.errors import Unavailable
from control_plane.store import Store
from devstack.pg import free_port
from tests.control_plane.store.conftest import Db

OUTAGE_SECONDS = 20.0
"""How long the server is absent while reads fail (each waits its pool's timeout): long enough for
the default back-off to leave 16 s between attempts (the next one at 31 s)."""


async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except ConnectionError:
        pass
    finally:
        w.close()


@asynccontextmanager
async def forwarder(port: int, to_host: str, to_port: int) -> AsyncIterator[None]:
    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection(to_host, to_port)
        await asyncio.gather(_pipe(cr, sw), _pipe(sr, cw))

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    try:
        yield
    finally:
        server.close()


async def test_a_server_that_comes_up_late_is_read_from_at_once(db: Db, store: Store) -> None:
    del store  # the fixture applied the schema to db
    params = conninfo_to_dict(db.dsn)  # the cluster's: its primary first
    host, port = str(params["host"]).split(",")[0], int(str(params["port"]).split(",")[0])
    late = free_port()
    params.pop("target_session_attrs", None)
    dsn = make_conninfo("", **{**params, "host": "127.0.0.1", "port": str(late)})
    s = await Store.open(dsn, max_size=2, timeout=1.0, wait=False)
    try:
        # The event hub's reads while nothing answers: each fails after its pool timeout.
        absent_until = time.monotonic() + OUTAGE_SECONDS
        while time.monotonic() < absent_until:
            try:
                await s.ping_any()
            except Unavailable:
                continue
            raise AssertionError("a read succeeded with no server listening")
        async with forwarder(late, host, port):
            # The server is there: the first read finds it (before: PoolTimeout, the pools' next
            # attempt 10-16 s away).
            s._pool_timeout = 5.0  # noqa: SLF001 - a read's wait, as the CA's default
            await s.ping_any()
    finally:
        await s.close()
