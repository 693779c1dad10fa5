"""Backups that forget retired keys.

Mechanism (see docs/database.md): a retired key's row is hard-deleted by the
CA. A backup taken afterwards must not hold its bytes, so :func:`backup`
first rewrites the key table (``VACUUM FULL``: dead tuples and free space
vanish with the old files), then :func:`forget_old_wal` switches WAL segments
and checkpoints the primary and then each standby (a standby removes WAL only
at its own restartpoint), so no server's pg_wal keeps the WAL that carried a
deleted key; then it switches to a fresh WAL segment and takes a
``pg_basebackup`` (tar, WAL streamed from that fresh segment).
Every backup's manifest lists the key ids present while it was taken; a
backup listing a key that is no longer live is *stale* and is shredded
(overwritten with zeros, then unlinked) once a newer clean backup exists.
:func:`reconcile` does exactly that and is run after every rotation or
revocation by ``keyward db backup-agent``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from dbops.binaries import PgError, chown_server, run, write_as_server
from dbops.spec import ClusterSpec, Node
from dbops.status import cluster_status

MANIFEST = "keyward-backup.json"
CHURN_TABLES = ("intermediate_keys",)


@dataclass(frozen=True)
class Backup:
    path: Path
    created: str
    key_ids: frozenset[str]
    event_seq: int
    key_states: tuple[tuple[str, str], ...] = ()
    """(key_id, state) as the copy holds them ("?": the state changed while it was taken). A backup
    whose states are not the live ones is not current: a key activated after it was taken would
    be restored pending, with no certificate (ids alone did not tell)."""


def primary_node(spec: ClusterSpec) -> Node:
    for s in cluster_status(spec):
        if s.reachable and s.role == "primary":
            return s.node
    raise PgError("no primary reachable: a backup needs the primary")


def _keys_and_seq(spec: ClusterSpec, node: Node) -> tuple[dict[str, str], int]:
    """Every key's state (key_id -> pending | active), and the last key event's seq."""
    with psycopg.connect(spec.conninfo(node), autocommit=True) as c:
        keys = {str(r[0]): str(r[1]) for r in c.execute("SELECT key_id, state FROM intermediate_keys")}
        row = c.execute("SELECT coalesce(max(seq), 0) FROM key_events").fetchone()
        return keys, int(row[0]) if row else 0


def current(b: Backup, live: dict[str, str]) -> bool:
    """The backup holds exactly the live keys, each in its live state."""
    return b.key_ids == frozenset(live) and dict(b.key_states) == live


def _rewrite_without_dead_rows(c: psycopg.Connection[Any], table: str, timeout: float = 30) -> None:
    """VACUUM FULL until neither the table nor its TOAST table holds a dead
    row version. VACUUM FULL keeps rows a running transaction may still see
    (the xmin horizon); a backup must wait for that horizon, never copy them."""
    deadline = time.monotonic() + timeout
    while True:
        c.execute(f"VACUUM (FULL) {table}")
        row = c.execute(
            "SELECT (SELECT dead_tuple_count FROM pgstattuple(%s::regclass)) + "
            "coalesce((SELECT (pgstattuple(reltoastrelid)).dead_tuple_count "
            "          FROM pg_class WHERE oid = %s::regclass AND reltoastrelid <> 0), 0)",
            (table, table)).fetchone()
        if row is not None and row[0] == 0:
            return
        if time.monotonic() > deadline:
            raise PgError(f"{table} still holds {row[0] if row else '?'} dead row versions after {timeout}s: "
                          "a long-running transaction holds the xmin horizon (see pg_stat_activity); "
                          "no backup was taken")
        time.sleep(0.5)  # poll interval of a bounded wait for the horizon to advance


def list_backups(spec: ClusterSpec) -> list[Backup]:
    root = Path(spec.backup_dir)
    out = []
    for d in sorted(root.glob("backup-*")):
        try:
            j = json.loads((d / MANIFEST).read_text())
        except (OSError, ValueError):
            continue  # unfinished, or being shredded
        out.append(Backup(d, j["created"], frozenset(j["key_ids"]), int(j["event_seq"]),
                          tuple(sorted((j.get("key_states") or {}).items()))))
    return out


def _warn(line: str) -> None:
    print(f"backup: {line}", file=sys.stderr, flush=True)


def forget_old_wal(spec: ClusterSpec, primary: Node, *, timeout: float = 60, step: float = 10) -> list[str]:
    """Remove every WAL segment written before now from the primary's and each standby's pg_wal.

    A checkpoint removes older segments on the primary only; a standby removes its own
    at a restartpoint. So: switch WAL segments, wait for each connected slot to pass the
    switch, CHECKPOINT the primary, then on each standby wait until it has replayed that
    checkpoint and CHECKPOINT it (a restartpoint). Every wait is bounded (``step`` seconds
    each, ``timeout`` in all). Returns the problems met (a standby unreachable or lagging,
    an inactive slot); raises when the primary cannot be checkpointed."""
    deadline = time.monotonic() + timeout
    problems: list[str] = []

    def until(c: psycopg.Connection[Any], sql: str, lsn: str) -> bool:
        end = min(deadline, time.monotonic() + step)
        while True:
            row = c.execute(sql, (lsn,)).fetchone()
            if row is not None and row[0]:
                return True
            if time.monotonic() >= end:
                return False
            time.sleep(0.05)  # poll interval of a bounded wait

    def bounded(c: psycopg.Connection[Any]) -> None:
        c.execute("SELECT set_config('statement_timeout', %s, false)",
                  (f"{int(max(0.1, deadline - time.monotonic()) * 1000)}ms",))

    with psycopg.connect(spec.conninfo(primary), autocommit=True) as c:
        bounded(c)
        c.execute("SELECT pg_switch_wal()")
        # The end of the padded segment (pg_switch_wal() returns the switch record's end,
        # inside it): a slot short of it still holds the old segment.
        row = c.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        if not until(c, "SELECT NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE active"
                        " AND (restart_lsn IS NULL OR restart_lsn < %s::pg_lsn))", row[0]):
            problems.append("a standby's slot did not pass the WAL switch in time: the primary keeps "
                            "the old segment until a later checkpoint")
        for (slot,) in c.execute("SELECT slot_name FROM pg_replication_slots WHERE NOT active"
                                 " AND restart_lsn < %s::pg_lsn", (row[0],)).fetchall():
            problems.append(f"replication slot {slot} is inactive: the primary keeps the WAL it holds")
        c.execute("CHECKPOINT")
        row = c.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        target = str(row[0])
    for node in spec.nodes:
        if node == primary:
            continue
        try:
            with psycopg.connect(spec.conninfo(node, dbname="postgres"), autocommit=True) as s:
                bounded(s)
                row = s.execute("SELECT pg_is_in_recovery()").fetchone()
                if row is None or not row[0]:
                    problems.append(f"{node.name} is not a standby; its pg_wal was left alone")
                elif not until(s, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", target):
                    problems.append(f"standby {node.name} did not replay up to {target} in time: its pg_wal "
                                    "keeps old segments until its next restartpoint")
                else:
                    s.execute("CHECKPOINT")  # a restartpoint: removes the standby's older segments
        except psycopg.Error as e:
            problems.append(f"standby {node.name}: {(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}; "
                            "its pg_wal keeps old segments until its next restartpoint")
    return problems


def backup(spec: ClusterSpec, *, log: Callable[[str], None] = _warn) -> Backup:
    """Take a backup of the primary in which no deleted key survives, and clear
    every server's pg_wal of the WAL written before it (problems go to ``log``)."""
    node = primary_node(spec)
    keys_before, seq = _keys_and_seq(spec, node)
    with psycopg.connect(spec.conninfo(node), autocommit=True) as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
        for t in CHURN_TABLES:
            _rewrite_without_dead_rows(c, t)
    for problem in forget_old_wal(spec, node):
        log(problem)
    with psycopg.connect(spec.conninfo(node), autocommit=True) as c:
        c.execute("SELECT pg_switch_wal()")  # the base backup's WAL starts in a fresh segment
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    root = Path(spec.backup_dir)
    root.mkdir(parents=True, exist_ok=True)
    chown_server(root)
    tmp = root / f"partial-{stamp}"
    # A slot of its own, created (and holding WAL) before the backup starts: the CA checkpoints and
    # recycles WAL after every retirement, and pg_basebackup's default temporary slot comes too late
    # for that ("requested WAL segment ... has already been removed", seen in a rotation race).
    slot = f"keyward_backup_{stamp.lower().replace('.', '_')}"
    for attempt in (1, 2):
        try:
            run("pg_basebackup", "-h", node.host, "-p", str(node.port), "-U", spec.repl_user, "-D", str(tmp),
                "-F", "tar", "-X", "stream", "-C", "-S", slot, "-c", "fast", "--no-manifest", timeout=900,
                env={"PGPASSFILE": spec.passfile})
            break
        except PgError as e:
            # Still seen, rarely, when a retirement's WAL purge (a switch and a checkpoint on every
            # server) lands while the copy starts: the copy is simply taken again, once.
            if attempt == 2 or "has already been removed" not in str(e):
                raise
            log("base backup lost a race with the WAL purge; taking it again")
            shutil.rmtree(tmp, ignore_errors=True)
        finally:
            with psycopg.connect(spec.conninfo(node), autocommit=True) as c:
                c.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                          "WHERE slot_name = %s AND NOT active", (slot,))
    keys_after, _ = _keys_and_seq(spec, node)
    ids = set(keys_before) | set(keys_after)
    states = {k: keys_before[k] if keys_before.get(k) == keys_after.get(k) else "?" for k in sorted(ids)}
    manifest = {"created": stamp, "source": node.name, "key_ids": sorted(ids), "event_seq": seq,
                "key_states": states}
    write_as_server(tmp / MANIFEST, json.dumps(manifest, indent=2))
    final = root / f"backup-{stamp}"
    os.rename(tmp, final)
    return Backup(final, stamp, frozenset(ids), seq, tuple(sorted(states.items())))


def shred(path: Path) -> None:
    """Take the backup out of the listing (atomic rename), overwrite every
    file with zeros, fsync, then remove the tree."""
    if path.name.startswith("backup-"):
        doomed = path.with_name("shredding-" + path.name[len("backup-"):])
        os.rename(path, doomed)
        path = doomed
    for f in sorted(path.rglob("*")):
        if f.is_file():
            size = f.stat().st_size
            with open(f, "r+b") as h:
                remaining = size
                block = bytes(1 << 20)
                while remaining > 0:
                    n = min(remaining, len(block))
                    h.write(block[:n])
                    remaining -= n
                h.flush()
                os.fsync(h.fileno())
    shutil.rmtree(path)


def reconcile(spec: ClusterSpec, keep: int = 3, log: Callable[[str], None] = lambda _: None) -> list[str]:
    """Ensure the newest backup is clean and no stale backup is kept.
    Each action is logged before it starts; returns them all."""
    did: list[str] = []

    def say(line: str) -> None:
        did.append(line)
        log(line)

    node = primary_node(spec)
    for _ in range(3):  # a rotation racing the backup makes it stale: go again
        live, _seq = _keys_and_seq(spec, node)
        backups = list_backups(spec)
        # The newest backup must hold every live key, in its live state, and no retired one.
        if backups and current(backups[-1], live):
            break
        newest = backups[-1] if backups else None
        say("took a new backup" if newest is None else
            "took a new backup (newest " + ("held a retired key" if newest.key_ids - set(live)
                                            else "lacked a live key" if set(live) - newest.key_ids
                                            else "held a key in another state") + ")")
        backup(spec, log=log)
    live, _ = _keys_and_seq(spec, node)
    for b in list_backups(spec):
        if b.key_ids - set(live):
            say(f"shredded {b.path.name} (held retired key(s) {', '.join(sorted(b.key_ids - set(live)))})")
            shred(b.path)
    kept = list_backups(spec)
    for b in kept[:-keep] if keep > 0 else []:
        say(f"shredded {b.path.name} (retention {keep})")
        shred(b.path)
    for pattern in ("partial-*", "shredding-*"):
        for p in Path(spec.backup_dir).glob(pattern):
            shred(p)
    return did


RESTORE_HOST = "127.0.0.1"
"""The address a restored server listens on (TCP), whatever its source listened on."""


def restore(backup_path: Path, root: Path, port: int, *, name: str = "restored") -> Node:
    """Unpack a backup into ``root/data`` and start it as a fresh primary listening on
    :data:`RESTORE_HOST` (the returned node's host) and in ``root`` (its Unix socket)."""
    if not (backup_path / MANIFEST).exists():
        raise PgError(f"{backup_path} is not a finished keyward backup (no {MANIFEST})")
    data = root / "data"
    if data.exists() and any(data.iterdir()):
        raise PgError(f"{data} is not empty; restore needs a fresh directory")
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    chown_server(root)
    data.mkdir(mode=0o700, exist_ok=True)
    with tarfile.open(backup_path / "base.tar") as t:
        t.extractall(data, filter="fully_trusted")
    with tarfile.open(backup_path / "pg_wal.tar") as t:
        t.extractall(data / "pg_wal", filter="fully_trusted")
    (data / "standby.signal").unlink(missing_ok=True)
    # Appended, so each line overrides the source's own (the last one read wins). The source's
    # listen_addresses may name an address of its host or network namespace only: binding it here
    # would fail, and the postmaster would not start.
    write_as_server(data / "postgresql.auto.conf",
                    f"listen_addresses = '{RESTORE_HOST}'\nport = {port}\nunix_socket_directories = '{root}'\n"
                    f"cluster_name = '{name}'\n"
                    "synchronous_standby_names = ''\nprimary_conninfo = ''\nprimary_slot_name = ''\n",
                    append=True)
    run_chown(data)
    node = Node(name, RESTORE_HOST, port, str(data))
    run("pg_ctl", "start", "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "120")
    return node


def run_chown(path: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(path):
        chown_server(Path(dirpath))
        for f in filenames:
            chown_server(Path(dirpath) / f)


_agent_log = logging.getLogger("keyward.backup-agent")


def agent(spec: ClusterSpec, *, interval: float = 1.0, stop_after: float | None = None) -> None:
    """Run :func:`reconcile` whenever a key is retired (polled), forever."""
    last_seq = -1
    t_end = None if stop_after is None else time.monotonic() + stop_after
    while t_end is None or time.monotonic() < t_end:
        try:
            node = primary_node(spec)
            with psycopg.connect(spec.conninfo(node), autocommit=True) as c:
                row = c.execute("SELECT coalesce(max(seq), 0) FROM key_events "
                                "WHERE kind IN ('rotated', 'revoked')").fetchone()
            seq = int(row[0]) if row else 0
            if seq != last_seq:
                reconcile(spec, log=lambda line: _agent_log.info("%s", line))
                last_seq = seq
        except (PgError, psycopg.Error) as e:
            _agent_log.warning("%s; retrying", str(e).splitlines()[0] if str(e) else type(e).__name__)
        time.sleep(interval)
