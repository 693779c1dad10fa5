"""Operations that need the server's files (the tool runs beside it).

Fencing a dead primary, rejoining it as a standby (pg_rewind, or a fresh
clone when rewinding is impossible), starting and stopping. Remote-only
nodes (no ``datadir`` in the spec) are fenced by their orchestrator instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

from dbops.binaries import PgError, chown_server, run, write_as_server
from dbops.spec import ClusterSpec, Node


def _datadir(node: Node) -> Path:
    if not node.datadir:
        raise PgError(f"node {node.name} has no local data directory in the cluster spec; "
                      "fence and rejoin it through its orchestrator")
    return Path(node.datadir)


def logfile(node: Node) -> Path:
    return _datadir(node).parent / "server.log"


def postmaster_pid(node: Node) -> int | None:
    """The running postmaster of the node's data directory, or None. The pid file outlives a
    killed server, and pids come round again (32768 here): a pid counts only if that process
    works in this very directory (a postmaster's cwd is its data directory)."""
    d = _datadir(node)
    try:
        pid = int((d / "postmaster.pid").read_text().splitlines()[0])
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, IndexError, ProcessLookupError):
        return None
    try:
        if os.readlink(f"/proc/{pid}/cwd") != str(d.resolve()):
            return None  # another process now has that pid
    except PermissionError:
        pass  # not ours to inspect: trust the pid file, as pg_ctl does
    except OSError:
        return None  # gone meanwhile
    return pid


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")  # a zombie holds no lock, but kill(0) sees it
    except (OSError, IndexError):  # gone between the listing and the read
        return True


def _kill_all(pids: list[int], timeout: float, what: str) -> float:
    """SIGKILL ``pids`` and wait, bounded, until they are gone; returns the deadline used."""
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while not all(_gone(p) for p in pids):
        if time.monotonic() > deadline:
            raise PgError(f"{what}: processes {pids} survived SIGKILL for {timeout}s")
        time.sleep(0.02)  # poll interval of a bounded wait
    return deadline


def kill_node(node: Node, timeout: float = 15) -> bool:
    """SIGKILL the postmaster and all its children at once (a crash), and
    wait until they are gone. True if it was running."""
    pid = postmaster_pid(node)
    if pid is None:
        return False
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    pids = [pid] + [int(k) for k in kids]
    deadline = _kill_all(pids, timeout, node.name)
    # Postgres refuses to start while a zombie of the old postmaster exists.
    while (not _gone(pid) or _exists(pid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return True


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def node_conf(node: Node) -> str:
    d = _datadir(node)
    return (f"listen_addresses = '{node.host}'\nport = {node.port}\nunix_socket_directories = '{d.parent}'\n"
            f"cluster_name = '{node.name}'\n")


def point_at(spec: ClusterSpec, node: Node, upstream: Node, *, datadir: Path | None = None) -> None:
    """Write standby.signal and the replication settings into the data directory (``datadir``:
    the node's, unless it is elsewhere for the moment)."""
    d = datadir or _datadir(node)
    write_as_server(d / "standby.signal", "")
    write_as_server(
        d / "postgresql.auto.conf",
        node_conf(node)
        + f"primary_conninfo = '{spec.replication_conninfo(upstream, node.name)}'\n"
        + f"primary_slot_name = '{spec.slot(node)}'\n"
        + "synchronous_standby_names = ''\n",
        append=True,
    )


def fence(spec: ClusterSpec, node: Node, new_primary: Node) -> None:
    """Make sure ``node`` can never come back as a second primary: stop it
    (it may be frozen or partitioned, not dead) and mark it a standby of the
    new primary, so a restart finds standby.signal."""
    kill_node(node)
    point_at(spec, node, new_primary)


def start(node: Node, timeout: int = 60) -> None:
    if postmaster_pid(node) is not None:
        return
    run("pg_ctl", "start", "-D", str(_datadir(node)), "-l", str(logfile(node)), "-w", "-t", str(timeout),
        netns=node.netns)


def stop(node: Node, mode: str = "fast") -> None:
    if postmaster_pid(node) is None:
        return
    run("pg_ctl", "stop", "-D", str(_datadir(node)), "-m", mode, "-w", "-t", "60", check=False)


def rejoin(spec: ClusterSpec, node: Node, primary: Node) -> str:
    """Bring ``node`` back as a standby of ``primary``. Returns how: 'rewind' or 'clone'.

    The data directory is renamed aside while it is rewound or replaced: a supervisor restarting
    the server meanwhile (systemd, the fault campaign's harness) finds no data directory and
    fails cleanly, instead of starting a server over files being rewritten (seen: a clone
    removing the files of a server just started, which then replayed garbage WAL forever). An
    interrupted rejoin (the watcher killed) is carried on from the renamed directory."""
    d = _datadir(node)
    with _rejoin_lock(node, d) as lock:
        return _rejoin(spec, node, primary, d, lock)


@contextlib.contextmanager
def _rejoin_lock(node: Node, d: Path) -> Iterator[int]:
    """One rejoin of a server at a time. The lock's descriptor is handed to pg_rewind and
    pg_basebackup, so it is held for as long as one of them runs: they outlive a watcher killed
    mid-rejoin, and a second rejoin over a directory still being rewritten corrupted its WAL
    ("record with incorrect prev-link", never streaming again)."""
    fd = os.open(d.parent / f"{d.name}.rejoin.lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PgError(f"{node.name}: a rejoin is still running (a pg_rewind or pg_basebackup of a killed "
                          "watcher, say); it is retried once that ends") from None
        yield fd
    finally:
        os.close(fd)


def _rejoin(spec: ClusterSpec, node: Node, primary: Node, d: Path, lock: int) -> str:
    work = d.with_name(d.name + ".rejoining")
    if d.exists() or not work.exists():
        _set_aside(node, d, work)
    else:  # carried on from an interrupted rejoin
        _kill_working_in(work)
    src = spec.conninfo(primary, dbname="postgres")
    how = "rewind"
    if control_state(work) == "in archive recovery":
        # A standby that crashed. pg_rewind would finish its crash recovery as a primary does,
        # writing a checkpoint record of its own at the end of its WAL, where the new primary has
        # other records on the same timeline: "no rewind required", then the restarted standby
        # met its own record ("record with incorrect prev-link") and never streamed again. It
        # recovers as a standby instead (no record written) and stops cleanly, then is rewound.
        if not _recover_as_standby(work, node):
            how = "clone; it could not recover as a standby"
    else:  # a primary that crashed: pg_rewind completes its crash recovery itself (single-user mode)
        (work / "standby.signal").unlink(missing_ok=True)
    p = run("pg_rewind", "-D", str(work), f"--source-server={src}", timeout=600, check=False,
            env={"PGPASSFILE": spec.passfile}, pass_fds=(lock,))
    lines = (p.stderr or p.stdout).strip().splitlines()
    said = (lines[-1].removeprefix("pg_rewind: ")[:160] if lines else f"exit {p.returncode}")
    if how.startswith("clone") or p.returncode != 0:
        how = how if how.startswith("clone") else f"clone; pg_rewind: {said}"
        _clone(spec, primary, work, lock)
    else:
        how = f"rewind; pg_rewind: {said}"
    _start_back(spec, node, primary, work, d)
    if how.startswith("rewind") and not follows(spec, node, primary):
        # pg_rewind found nothing to rewind, or rewound, yet the server cannot replay what the
        # primary sends (fault campaign, seed 879: a killed primary, "no rewind required", then
        # "invalid resource manager ID" at its own last record forever, every write waiting for
        # it). Its WAL is not the primary's: it is cloned afresh.
        _set_aside(node, d, work)
        _clone(spec, primary, work, lock)
        _start_back(spec, node, primary, work, d)
        how = f"clone; it did not follow the primary after the rewind ({said})"
    return how


FOLLOW_SECONDS = 30.0
"""How long a rewound server has to replay a record the primary writes after its start (a
streaming standby does in well under a second) before it is cloned afresh instead."""


def follows(spec: ClusterSpec, node: Node, primary: Node, timeout: float = FOLLOW_SECONDS) -> bool:
    """Does ``node`` replay what ``primary`` writes now? A fresh token is written on the primary
    (committed locally: nothing waits for the standbys, this one among them) in the ``postgres``
    database; true once ``node`` reads it. By content, not by LSN: a server whose own WAL went
    past the primary's fork point is at a higher LSN than what it fails to replay."""
    deadline = time.monotonic() + timeout
    token = os.urandom(8).hex()
    written = False
    while time.monotonic() < deadline:
        try:
            if not written:
                with psycopg.connect(spec.conninfo(primary, dbname="postgres"), autocommit=True) as c:
                    c.execute("SET synchronous_commit = local")
                    c.execute("CREATE TABLE IF NOT EXISTS keyward_rejoin_marks (node text PRIMARY KEY, mark text)")
                    c.execute("INSERT INTO keyward_rejoin_marks VALUES (%s, %s)"
                              " ON CONFLICT (node) DO UPDATE SET mark = EXCLUDED.mark", (node.name, token))
                written = True
            with psycopg.connect(spec.conninfo(node, dbname="postgres"), autocommit=True) as c:
                row = c.execute("SELECT mark FROM keyward_rejoin_marks WHERE node = %s", (node.name,)).fetchone()
                if row and row[0] == token:
                    return True
        except psycopg.Error:
            pass  # starting up, or the table not replayed yet: asked again until the deadline
        time.sleep(0.2)  # poll interval of a bounded wait
    return False


def _set_aside(node: Node, d: Path, work: Path) -> None:
    """Stop the server and rename its data directory to ``work``: from then on nobody can start it."""
    kill_node(node)
    shutil.rmtree(work, ignore_errors=True)  # a leftover beside a live directory: the live one wins
    os.rename(d, work)
    _kill_working_in(work)  # a server started between the kill and the rename


def _clone(spec: ClusterSpec, primary: Node, work: Path, lock: int) -> None:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o700)
    chown_server(work)
    run("pg_basebackup", "-h", primary.host, "-p", str(primary.port), "-U", spec.repl_user, "-D", str(work),
        "-X", "stream", "-c", "fast", timeout=900, env={"PGPASSFILE": spec.passfile}, pass_fds=(lock,))


def _start_back(spec: ClusterSpec, node: Node, primary: Node, work: Path, d: Path) -> None:
    """Point the server in ``work`` at ``primary``, give it its name back and start it."""
    point_at(spec, node, primary, datadir=work)
    os.rename(work, d)
    try:
        start(node)
    except PgError:
        # A supervisor may start it first, now that the directory is back: running is what counts.
        deadline = time.monotonic() + 15
        while postmaster_pid(node) is None:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)  # poll interval of a bounded wait


def control_state(d: Path) -> str:
    """pg_controldata's "Database cluster state" (in production, in archive recovery, shut down,
    shut down in recovery, ...); "" if it cannot be read."""
    p = run("pg_controldata", "-D", str(d), check=False)
    for line in p.stdout.splitlines():
        if line.startswith("Database cluster state:"):
            return line.split(":", 1)[1].strip()
    return ""


def _recover_as_standby(d: Path, node: Node, timeout: int = 60) -> bool:
    """Start the server in ``d`` as a standby with no upstream until it is consistent (its own
    WAL replayed, nothing written), then stop it cleanly ("shut down in recovery", which
    pg_rewind accepts). False if it could not (then it is cloned afresh)."""
    write_as_server(d / "standby.signal", "")
    write_as_server(d / "postgresql.auto.conf", "primary_conninfo = ''\nprimary_slot_name = ''\n", append=True)
    log = str(d.parent / "server.log")
    ok = run("pg_ctl", "start", "-D", str(d), "-l", log, "-w", "-t", str(timeout), check=False,
             netns=node.netns).returncode == 0
    if ok:
        ok = run("pg_ctl", "stop", "-D", str(d), "-m", "fast", "-w", "-t", str(timeout), check=False).returncode == 0
    if not ok:
        _kill_working_in(d)
    return ok and control_state(d) == "shut down in recovery"


def _kill_working_in(d: Path, timeout: float = 15) -> None:
    """SIGKILL every process whose working directory is ``d``: a postmaster (and each of its
    children) works in its data directory. One started just before ``d`` was renamed has
    followed it there, maybe before writing its pid file; one that had not yet changed into it
    fails to (the old name is gone). So after the rename this finds every server that could
    write into ``d``."""
    target = str(d.resolve())
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(proc / "cwd") == target:
                    pids.append(int(proc.name))
    _kill_all(pids, timeout, f"working in {d}")
