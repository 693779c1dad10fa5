"""The campaign's backup invariant: the newest backup restores every live key.

:func:`check_newest_backup` does what an operator's tooling does: :func:`dbops.backup.reconcile`
(what `keyward db backup-agent` runs after each retirement: a new backup when the newest lacks a
live key or holds a retired one, then stale backups shredded), then restores the newest backup
with :func:`dbops.backup.restore` (`keyward db restore`) into a scratch directory and compares
its key rows with the live primary's. Key bytes never leave either server: each side hashes its
own (``sha256`` in SQL), and only key ids, orgs and states are ever printed.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from dbops import backup as dbbackup
from dbops.binaries import PgError, run
from dbops.spec import ClusterSpec, Node
from devstack.pg import free_port

EVERY = int(os.environ.get("KEYWARD_CHAOS_BACKUP_EVERY", "5") or 0)
"""Check the newest backup every EVERY cycles and on the last one (0: never)."""

STATEMENT_TIMEOUT_MS = 30_000
CONNECT_WAIT = 30.0
"""Seconds a restored server (started with pg_ctl -w, so already up) gets to accept a session."""

# A key as the CA stores it: its org, its state, and digests of its sealed (encrypted) private
# key and of its certificate (NULL while pending). The certificate and the state count: a key
# restored without the certificate it has live is no key a restored CA can serve.
KEY_ROWS = ("SELECT key_id::text, org_id, state, encode(sha256(sealed_key), 'hex'), "
            "encode(sha256(convert_to(coalesce(certificate_pem, ''), 'UTF8')), 'hex') FROM intermediate_keys")


@dataclass(frozen=True)
class KeyRow:
    org_id: str
    state: str
    sealed_sha256: str
    cert_sha256: str


@dataclass
class BackupCheck:
    """The outcome of one check: ``violations`` empty means the invariant held."""

    violations: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    """What reconcile did (a new backup, backups shredded), in order."""
    backup: str = ""
    """The name of the newest backup, the one restored."""
    live_keys: int = 0
    restored_keys: int = 0
    reconcile_seconds: float = 0.0
    restore_seconds: float = 0.0
    """Restore, start, read and compare, and the stop of the restored server."""

    @property
    def seconds(self) -> float:
        return self.reconcile_seconds + self.restore_seconds

    def summary(self) -> str:
        did = "; ".join(self.actions) if self.actions else "already current"
        return (f"newest backup {self.backup or '-'} ({did}) restored {self.restored_keys} keys "
                f"of {self.live_keys} live in {self.seconds:.1f}s (reconcile {self.reconcile_seconds:.1f}s, "
                f"restore + compare {self.restore_seconds:.1f}s)")


def due(n: int, cycles: int, every: int = EVERY) -> bool:
    """Whether cycle ``n`` (from 0) of ``cycles`` checks the newest backup."""
    return every > 0 and ((n + 1) % every == 0 or n == cycles - 1)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _key_rows(conninfo: str) -> dict[str, KeyRow]:
    with psycopg.connect(conninfo, autocommit=True) as c:
        c.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
        rows: list[tuple[Any, ...]] = c.execute(KEY_ROWS).fetchall()
    return {str(r[0]): KeyRow(str(r[1]), str(r[2]), str(r[3]), str(r[4])) for r in rows}


def _restored_rows(spec: ClusterSpec, node: Node) -> dict[str, KeyRow]:
    """The restored server's key rows, over TCP at the node's host (as a CA would reach it); retried
    for at most CONNECT_WAIT seconds while the server does not accept a session yet."""
    deadline = time.monotonic() + CONNECT_WAIT
    while True:
        try:
            return _key_rows(spec.conninfo(node, application_name="keyward-chaos-backup-check"))
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)  # poll interval of a bounded wait


def compare(live: dict[str, KeyRow], restored: dict[str, KeyRow], backup: str) -> list[str]:
    """Every live key restored with its org, state, sealed key and certificate; no other key
    restored. One line per key at fault, naming it and what differs (never its bytes)."""
    out: list[str] = []
    for kid in sorted(live.keys() - restored.keys()):
        out.append(f"live key {kid} of {live[kid].org_id} ({live[kid].state}) is missing in the restore of {backup}")
    for kid in sorted(restored.keys() - live.keys()):
        out.append(f"the restore of {backup} holds key {kid} of {restored[kid].org_id}, which is no longer live "
                   "(retired: its bytes outlive the retirement in the newest backup)")
    for kid in sorted(live.keys() & restored.keys()):
        a, b = live[kid], restored[kid]
        what = [name for name, x, y in (("org", a.org_id, b.org_id), ("sealed private key bytes (sha256)",
                                        a.sealed_sha256, b.sealed_sha256), ("state", a.state, b.state),
                                        ("certificate (sha256)", a.cert_sha256, b.cert_sha256)) if x != y]
        if what:
            out.append(f"key {kid} of {a.org_id} ({a.state} live, {b.state} restored): {', '.join(what)} "
                       f"differ between the primary and the restore of {backup}")
    return out


def _stop(data: Path) -> None:
    """Stop the restored server at once (its data is thrown away), bounded."""
    if (data / "postmaster.pid").exists():
        run("pg_ctl", "stop", "-D", str(data), "-m", "immediate", "-w", "-t", "30", timeout=60, check=False)


def check_newest_backup(spec_path: Path, scratch: Path, *, keep_log: Path | None = None) -> BackupCheck:
    """Make the newest backup current (reconcile), restore it into ``scratch`` (a new directory
    the postgres user can reach, removed afterwards with the restored server stopped) on a free
    port, and compare its key rows with the live primary's (see :func:`compare`). Call it with
    the writers paused: a key retired between the two reads would be reported. When there are
    violations and ``keep_log`` is given, the restored server's log is copied there."""
    if scratch.exists():
        raise ValueError(f"{scratch} exists: the check restores into a new directory, and removes it")
    spec = ClusterSpec.load(spec_path)
    res = BackupCheck()
    t0 = time.monotonic()
    try:
        res.actions = dbbackup.reconcile(spec)
        backups = dbbackup.list_backups(spec)
        live = _key_rows(spec.conninfo(dbbackup.primary_node(spec), application_name="keyward-chaos-backup-check"))
    except (PgError, psycopg.Error, OSError) as e:
        res.violations.append(f"reconcile (the backup agent's step) failed: {_first_line(e)}")
        return res
    finally:
        res.reconcile_seconds = time.monotonic() - t0
    res.live_keys = len(live)
    if not backups:
        res.violations.append(f"no backup in {spec.backup_dir} after reconcile")
        return res
    newest = backups[-1]
    res.backup = newest.path.name
    if newest.key_ids != live.keys():
        # What reconcile promised, from the manifest alone; the restore below checks the bytes.
        res.violations.append(f"after reconcile the manifest of {newest.path.name} lists "
                              f"{len(newest.key_ids - live.keys())} retired and lacks "
                              f"{len(live.keys() - newest.key_ids)} live key(s)")
    t1 = time.monotonic()
    try:
        node = dbbackup.restore(newest.path, scratch, free_port(), name="backup-check")
        restored = _restored_rows(spec, node)
        res.restored_keys = len(restored.keys() & live.keys())
        res.violations += compare(live, restored, newest.path.name)
    except (PgError, psycopg.Error, OSError) as e:
        res.violations.append(f"restoring {newest.path.name} failed: {_first_line(e)}")
    finally:
        _stop(scratch / "data")
        log = scratch / "server.log"
        if res.violations and keep_log is not None and log.exists():
            shutil.copyfile(log, keep_log)
        shutil.rmtree(scratch, ignore_errors=True)
        res.restore_seconds = time.monotonic() - t1
    return res
