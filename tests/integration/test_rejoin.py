"""dbops.local.rejoin against real servers, with a supervisor restarting the server meanwhile.

Found by the fault campaign (seed 879): the watcher rejoined a fenced standby while the harness,
as a supervisor would, restarted it. A start landing between rejoin's kill and its pg_rewind made
the rewind fail, and the fallback clone removed the files of the server just started; the
server then replayed garbage WAL forever ("invalid resource manager ID") and never streamed.
The data directory is now renamed aside while it is rewound or replaced: a start meanwhile fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dbops import failover as dbfailover
from dbops import local
from devstack.pg import PgCluster, PgError
from tests.helpers import three_servers, wait_for


@pytest.fixture(scope="module")
def cluster(workdir: Path) -> Iterator[PgCluster]:
    yield from three_servers(workdir / "pg-rejoin")


def test_a_standby_killed_then_rejoined_streams_and_confirms_again(cluster: PgCluster) -> None:
    """pg_rewind finished a crashed standby's recovery as a primary would, writing a checkpoint
    record of its own where the primary has others on the same timeline: "no rewind required",
    then the standby stopped at its own record ("record with incorrect prev-link") and every
    write waited for it forever (the campaign's standby "answering, not streaming", seeds 11 and
    879). A failover fences every server down, standbys included, so this is every rejoin of a
    standby that crashed."""
    cluster.wait_synchronous(60)
    primary = cluster.primary()
    standby = next(n for n in cluster.nodes if n.name != primary.name)
    spec = cluster.spec()
    how = local.rejoin(spec, spec.node(standby.name), spec.node(primary.name))  # kills it first: a crash
    assert how.startswith("rewind"), how
    # Acknowledged only once both standbys confirm (ANY 2): bounded, not a hang.
    primary.psql("SET statement_timeout = '20s'; CREATE TABLE IF NOT EXISTS after_crash (n int); "
                 "INSERT INTO after_crash VALUES (1)")
    assert standby.psql("SELECT count(*) FROM after_crash") == "1"
    assert "incorrect prev-link" not in standby.logfile.read_text()


def test_a_rejoin_survives_a_supervisor_restarting_the_server_meanwhile(cluster: PgCluster) -> None:
    old = cluster.primary()
    cluster.psql("CREATE TABLE IF NOT EXISTS rejoined (n int)")
    cluster.psql("INSERT INTO rejoined VALUES (1)")
    spec = cluster.spec()
    assert local.kill_node(spec.node(old.name))
    rep = dbfailover.failover(spec, rejoin=False)
    new = next(n for n in cluster.nodes if n.name == rep.new_primary)
    stop, starts, refused = threading.Event(), [0], [0]

    def supervisor() -> None:  # systemd's Restart=always, faster: a start every 20 ms
        while not stop.is_set():
            try:
                if not old.running():
                    old.start()
                    starts[0] += 1
            except PgError:
                refused[0] += 1
            stop.wait(0.02)

    log_from = old.logfile.stat().st_size if old.logfile.exists() else 0
    th = threading.Thread(target=supervisor, daemon=True)
    th.start()
    try:
        how = local.rejoin(spec, spec.node(old.name), spec.node(new.name))
    finally:
        stop.set()
        th.join(60)
    assert refused[0] > 0, "the supervisor never tried to start the server during the rejoin"
    with open(old.logfile, "rb") as f:
        f.seek(log_from)
        during = f.read().decode(errors="replace")
    # No server ever ran over files being rewound or replaced.
    assert "PANIC" not in during and "could not open file" not in during, during[-3000:]
    new.psql("INSERT INTO rejoined VALUES (2)")
    cluster.wait_synchronous(60)
    wait_for(lambda: old.running() and old.psql("SELECT string_agg(n::text, ',' ORDER BY n) FROM rejoined") == "1,2",
             60, f"{old.name} ({how}) to stream the new primary's write")
    assert old.psql("SELECT pg_is_in_recovery()", dbname="postgres") == "t"


def test_a_rejoin_waits_for_the_pg_rewind_a_killed_watcher_left_running(cluster: PgCluster) -> None:
    """A watcher SIGKILLed during a rejoin leaves its pg_rewind (or pg_basebackup) running; the
    restarted watcher rewound the same directory at the same time and its WAL came out corrupt
    ("record with incorrect prev-link"; campaign seed 879). Stand-in for the orphan: a process
    that inherited the rejoin lock from its parent, which then exited."""
    cluster.wait_synchronous(60)
    primary = cluster.primary()
    standby = next(n for n in cluster.nodes if n.name != primary.name)
    spec = cluster.spec()
    lockfile = standby.datadir.parent / f"{standby.datadir.name}.rejoin.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, subprocess, sys\n"
        f"fd = os.open({str(lockfile)!r}, os.O_WRONLY | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "p = subprocess.Popen(['sleep', '600'], pass_fds=(fd,), start_new_session=True)\n"
        "print(p.pid, flush=True)\n")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    orphan = int(holder.stdout.readline())
    holder.wait(30)  # the "watcher" is gone; its child holds the lock
    try:
        with pytest.raises(PgError, match="a rejoin is still running"):
            local.rejoin(spec, spec.node(standby.name), spec.node(primary.name))
        assert standby.running(), "a refused rejoin must leave the server alone"
    finally:
        os.kill(orphan, signal.SIGKILL)
    wait_for(lambda: _gone(orphan), 30, "the orphan to be gone")
    how = local.rejoin(spec, spec.node(standby.name), spec.node(primary.name))
    try:
        cluster.wait_synchronous(60)
    except PgError as e:
        raise AssertionError(f"{e}: {primary.psql('SELECT application_name, state, sync_state FROM pg_stat_replication', dbname='postgres')}\n{standby.logfile.read_text()[-3000:]}") from None
    primary.psql("CREATE TABLE IF NOT EXISTS after_orphan (n int)")
    primary.psql("INSERT INTO after_orphan VALUES (1)")
    wait_for(lambda: standby.running() and standby.psql("SELECT count(*) FROM after_orphan") == "1", 60,
             f"{standby.name} ({how}) to stream again")


def test_a_server_that_cannot_follow_after_its_rewind_is_cloned(cluster: PgCluster,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault campaign, seed 879 (CI): a primary killed, its watcher killed 0.8 s later; the
    restarted watcher rejoined it ("rewind"), and the server then replayed "invalid resource
    manager ID" at its own last record forever, not streaming, every write waiting for it. A
    rejoin now checks that the server replays what the primary writes after its start, and
    clones it afresh when it does not.

    pg_rewind's wrong verdict cannot be brought about at will, so it stands in here: a pg_rewind
    that does nothing, for an old primary whose WAL goes past the new primary's (written with the
    standbys cut off, committed locally)."""
    cluster.wait_synchronous(60)
    old = cluster.primary()
    standbys = [n for n in cluster.nodes if n.name != old.name]
    old.psql("CREATE TABLE IF NOT EXISTS before_cut (n int)")
    old.psql("INSERT INTO before_cut VALUES (1)")
    cluster.wait_synchronous(60)
    for n in standbys:  # their walreceivers stop: nothing more reaches them
        n.psql("ALTER SYSTEM SET primary_conninfo = ''", dbname="postgres")
        n.psql("SELECT pg_reload_conf()", dbname="postgres")
    for n in standbys:
        wait_for(lambda n=n: n.psql("SELECT count(*) FROM pg_stat_wal_receiver", dbname="postgres") == "0",  # type: ignore[misc]
                 30, f"{n.name}'s walreceiver to stop")
    old.psql("SET synchronous_commit = local; CREATE TABLE diverged (n int); INSERT INTO diverged VALUES (1)")
    spec = cluster.spec()
    assert local.kill_node(spec.node(old.name))
    rep = dbfailover.failover(spec, rejoin=False)
    new = next(n for n in cluster.nodes if n.name == rep.new_primary)
    real_run = local.run

    def run(*argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
        if argv and argv[0] == "pg_rewind":  # the stand-in: "no rewind required", wrongly
            return subprocess.CompletedProcess(list(argv), 0, "pg_rewind: no rewind required\n", "")
        return real_run(*argv, **kw)  # type: ignore[arg-type]
    monkeypatch.setattr(local, "run", run)
    how = local.rejoin(spec, spec.node(old.name), spec.node(new.name))
    assert how.startswith("clone; it did not follow the primary after the rewind"), how
    new.psql("CREATE TABLE IF NOT EXISTS after_clone (n int)")
    new.psql("INSERT INTO after_clone VALUES (1)")  # ANY 2: acknowledged once the clone confirms too
    cluster.wait_synchronous(60)
    assert old.psql("SELECT count(*) FROM after_clone") == "1"
    assert old.psql("SELECT to_regclass('diverged') IS NULL", dbname=cluster.spec().dbname) == "t"


def _gone(pid: int) -> bool:
    """(Not our child: its parent exited, init reaps it.)"""
    try:
        os.kill(pid, 0)
        return False
    except ProcessLookupError:
        return True
