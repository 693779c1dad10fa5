"""`keyward db watch` against three real Postgres servers: a lost primary is replaced by itself.

The watcher runs as `make up` runs it (its own process, JSON lines on stderr). SIGKILL of the
primary (all its processes: a machine crash); the watcher waits ``--after`` seconds with no
primary, promotes the most advanced standby, re-points the other and rejoins the old one; a
write is then acknowledged by the new primary and is on every server. Restarted, the watcher
remembers the last primary it saw (its state file), so it recognises the cluster it watched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dbops import local
from devstack.pg import PgCluster
from tests.helpers import stopped_at_failpoint, three_servers, wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(workdir: Path) -> Iterator[PgCluster]:
    yield from three_servers(workdir / "pg-watch")


def _watch(cluster: PgCluster, log: Path, state: Path, failpoints: str = "") -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARD_")}
    if failpoints:
        env["KEYWARD_FAILPOINTS"] = failpoints
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "control_plane", "db", "--cluster", str(cluster.spec_path),
                                 "watch", "--after", "1", "--state", str(state)], cwd=ROOT, env=env,
                                stdout=out, stderr=out)


def _lines(log: Path) -> list[dict[str, object]]:
    return [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]


def test_the_watcher_fails_over_by_itself_and_remembers_the_primary(cluster: PgCluster, tmp_path: Path) -> None:
    log, state = tmp_path / "watch.log", tmp_path / "watch-state.json"
    old = cluster.primary()
    proc = _watch(cluster, log, state)
    try:
        wait_for(lambda: state.exists() and json.loads(state.read_text())["last_primary"] == old.name, 30,
                 "the watcher to see the primary")
        cluster.psql("CREATE TABLE IF NOT EXISTS watched (n int)")
        cluster.psql("INSERT INTO watched VALUES (1)")
        assert local.kill_node(cluster.spec().node(old.name))
        done = wait_for(lambda: [ln for ln in _lines(log) if ln.get("msg") == "failed over"], 90,
                        "the watcher to fail over")[-1]
        assert done["old_primary"] == old.name and done["new_primary"] != old.name
        assert any(str(s).startswith(f"rejoined {old.name}") for s in done["steps"]), done  # type: ignore[attr-defined]
        new = cluster.primary()
        assert new.name == done["new_primary"]
        new.psql("INSERT INTO watched VALUES (2)")  # acknowledged: synchronous standbys answer again
        cluster.wait_synchronous(60)
        for n in cluster.nodes:  # the acknowledged writes are on every server, the old primary included
            wait_for(lambda n=n: n.running() and n.psql("SELECT string_agg(n::text, ',' ORDER BY n) FROM watched")
                     == "1,2", 60, f"both rows on {n.name}")
        lost = [ln for ln in _lines(log) if "no server answers as primary" in str(ln.get("msg"))]
        assert len(lost) == 1  # said once, not at every look
        assert all({"time", "level", "logger"} <= set(ln) for ln in _lines(log))
    finally:
        proc.terminate()
        proc.wait(15)
    # Restarted: it starts from the primary it last saw, the new one.
    assert json.loads(state.read_text())["last_primary"] == done["new_primary"]
    proc = _watch(cluster, log, state)
    try:
        started = wait_for(lambda: [ln for ln in _lines(log) if ln.get("msg") == "watching"][1:], 30,
                           "the restarted watcher")[-1]
        assert started["last_primary"] == done["new_primary"]
    finally:
        proc.terminate()
        proc.wait(15)


@pytest.mark.parametrize("step", ["fenced", "configured", "promoted", "repointed"])
def test_a_watcher_killed_in_the_middle_of_a_failover_finishes_it_after_its_restart(
        cluster: PgCluster, tmp_path: Path, step: str) -> None:
    """Killed right after pg_promote (the promotion came before the configuration then), the
    watcher left a primary whose synchronous_standby_names
    were a standby's (empty: it acknowledged writes no standby held), the other standby pointed
    at the dead primary and the old primary down for good: the restarted watcher saw "primary
    answers" and did nothing. It now keeps the failover's servers to rejoin in its state file
    (before the first step) and finishes it."""
    log, state = tmp_path / "watch.log", tmp_path / "watch-state.json"
    cluster.wait_synchronous(60)
    old = cluster.primary()
    proc = _watch(cluster, log, state, failpoints=f"dbops.failover.{step}")
    try:
        wait_for(lambda: state.exists() and json.loads(state.read_text())["last_primary"] == old.name, 30,
                 "the watcher to see the primary")
        assert local.kill_node(cluster.spec().node(old.name))
        wait_for(lambda: stopped_at_failpoint(proc.pid), 60, f"the watcher to stop at dbops.failover.{step}")
        assert json.loads(state.read_text())["unfinished"] == [old.name]
        if step == "promoted":
            # A primary with its quorum and slots from its first instant: promoted first and configured
            # after, it acknowledged writes alone meanwhile, and its first WAL segment on the new
            # timeline was removed before the others streamed it (campaign seed 1130, cycle 88).
            fresh = cluster.primary()
            assert fresh.psql("SHOW synchronous_standby_names") == cluster.spec().sync_names(fresh.name)
            slots = fresh.psql("SELECT string_agg(slot_name, ',' ORDER BY slot_name) FROM pg_replication_slots",
                               dbname="postgres")
            assert slots == ",".join(sorted(n.name for n in cluster.nodes if n.name != fresh.name)), slots
    finally:
        proc.kill()
        proc.wait(15)
    proc = _watch(cluster, log, state)
    try:
        if step in ("promoted", "repointed"):
            done = wait_for(lambda: [ln for ln in _lines(log) if ln.get("msg") == "finished an interrupted failover"],
                            90, "the restarted watcher to finish the failover")[-1]
            assert any(str(s).startswith(f"rejoined {old.name}") for s in done["steps"]), done  # type: ignore[attr-defined]
        else:  # fenced or configured, not promoted: no primary yet, the restarted watcher fails over itself
            wait_for(lambda: [ln for ln in _lines(log) if ln.get("msg") == "failed over"], 90,
                     "the restarted watcher to fail over")
        cluster.wait_synchronous(90)
        new = cluster.primary()
        assert new.name != old.name
        assert new.psql("SHOW synchronous_standby_names") == cluster.spec().sync_names(new.name)
        new.psql("CREATE TABLE IF NOT EXISTS resumed (step text)")
        new.psql(f"INSERT INTO resumed VALUES ('{step}')")
        for n in cluster.nodes:
            wait_for(lambda n=n: n.running() and step in n.psql("SELECT string_agg(step, ',') FROM resumed"),
                     60, f"the row on {n.name}")
        wait_for(lambda: json.loads(state.read_text())["unfinished"] == [], 30, "the state file to forget it")
    finally:
        proc.terminate()
        proc.wait(15)
