"""Postgres storage of the CA: the only package that touches psycopg.

Contract
--------
* Every admin write is one unit of work (:mod:`.work`): one transaction,
  under one advisory lock, that looks up the request id, mutates, then
  remembers the request, writes its key events and appends its audit row,
  so an action and its audit event commit together or not at all.
* Which orgs a pool serves is asked of one view, ``pool_orgs_served``, the
  SQL form of :func:`control_plane.authz.pool_serves`; each key event names
  its audience when it is written (:mod:`.events`).
* Retiring a key is a hard DELETE of its row, sealed key and certificate, in
  the same transaction; the WAL that carried it is then removed from every
  server (:mod:`.keys`, :mod:`.wal`).
* Library errors become :mod:`control_plane.errors` classes.

Modules: :mod:`.tx` (connections, transactions, replica reads, migration of
``schema.sql``), :mod:`.rows` (the values returned), :mod:`.work` (the unit
of work), and one module per kind of object: :mod:`.orgs`, :mod:`.pools`,
:mod:`.keys`, :mod:`.audit`, :mod:`.events` (the key-event log), :mod:`.wal`.
"""

from __future__ import annotations

from control_plane.store.audit import Audit, AuditEntry
from control_plane.store.events import NOTIFY_CHANNEL, Events
from control_plane.store.keys import Keys
from control_plane.store.orgs import Orgs
from control_plane.store.pools import Pools
from control_plane.store.rows import (
    NO_REQUEST,
    ActiveKey,
    Actor,
    IntermediateRow,
    KeyEventRow,
    OrgRow,
    PoolRow,
    RequestKey,
)
from control_plane.store.tx import SCHEMA, SCHEMA_PROBE, WRITE_LOCK
from control_plane.store.wal import Wal

__all__ = [
    "NO_REQUEST", "NOTIFY_CHANNEL", "SCHEMA", "SCHEMA_PROBE", "WRITE_LOCK", "ActiveKey", "Actor", "AuditEntry",
    "IntermediateRow", "KeyEventRow", "OrgRow", "PoolRow", "RequestKey", "Store",
]


class Store(Orgs, Pools, Keys, Audit, Events, Wal):
    """The CA's database. Create with :meth:`open`, release with :meth:`close`.

    A ``rw`` pool over the multi-host DSN (target_session_attrs=read-write)
    for every write and for the reads that decide one; a pool per server for
    key-distribution reads, standbys first, the next server asked too when one
    is late (:mod:`.tx`), so ZENs keep getting keys while any server that holds
    them answers and admin writes never land on a standby.
    """
