"""A database of its own for each store test module (on the session's Postgres cluster),
and a :class:`Store` over it with the schema applied."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from control_plane.store import Actor, Store
from devstack.pg import PgCluster

ADMIN = Actor("spiffe://keyward/platform-admin")


@dataclass(frozen=True)
class Db:
    name: str
    dsn: str
    pg: PgCluster

    def sql(self, query: str) -> str:
        """``query`` as the superuser, in this database (psql's unaligned output)."""
        return self.pg.psql(query, dbname=self.name)


@pytest.fixture(scope="module")
def db(pg: PgCluster) -> Iterator[Db]:
    name = f"store_{uuid.uuid4().hex[:10]}"
    pg.psql(f"CREATE DATABASE {name} OWNER keyward", dbname="postgres")
    dsn = pg.dsn()
    assert " dbname=keyward " in f" {dsn} "
    yield Db(name, f" {dsn} ".replace(" dbname=keyward ", f" dbname={name} ").strip(), pg)
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", dbname="postgres")


@pytest.fixture
async def store(db: Db) -> AsyncIterator[Store]:
    s = await Store.open(db.dsn, max_size=2)
    try:
        await s.migrate()
        yield s
    finally:
        await s.close()


def new_id(prefix: str = "o") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
