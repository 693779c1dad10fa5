"""The three-server cluster under faults, with a real CA in front of it:
synchronous state, a frozen standby, a stopped standby, refused failovers,
a standby promoted behind keyward's back, a wrong DSN, a dead server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from dbops import failover, local, status
from devstack.pg import PgCluster, free_port
from protos.keyward.v1 import keyward_pb2 as pb
from tests.helpers import CAProcess, clients, code_of, start_ca, wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cl(workdir: Path) -> Iterator[PgCluster]:
    c = PgCluster(workdir / f"pg-{uuid.uuid4().hex[:6]}", (free_port(), free_port(), free_port()))
    c.init()
    yield c
    for n in c.nodes:  # a test may have left a node frozen
        pid = n.pid()
        if pid:
            subprocess.run(["pkill", "-CONT", "-P", str(pid)], check=False)
            os.kill(pid, signal.SIGCONT)
    c.destroy()


@pytest.fixture
def cca(cl: PgCluster, pki_dir: Path, master_secret: tuple[bytes, Path], workdir: Path) -> Iterator[CAProcess]:
    ca = start_ca(cl, pki_dir, master_secret[1], workdir / "ca-faults", KEYWARD_MAX_CALL_SECONDS="3")
    yield ca
    ca.stop()


def _create(ca: CAProcess, pki_dir: Path, org: str, timeout: float = 20) -> tuple[grpc.StatusCode, str, float]:
    c = clients(ca.addr, pki_dir, "platform-admin")
    t0 = time.monotonic()
    try:
        c.admin.CreateOrganization(pb.CreateOrganizationRequest(org_id=org, request_id=f"rq-{org}"), timeout=timeout)
        return grpc.StatusCode.OK, "", time.monotonic() - t0
    except grpc.RpcError as e:
        return e.code(), e.details() or "", time.monotonic() - t0


def _count(node: object, org: str) -> str:
    return node.psql(f"SELECT count(*) FROM organizations WHERE org_id = '{org}'")  # type: ignore[attr-defined]


def test_both_standbys_synchronous_and_status_command(pg: PgCluster) -> None:
    rows = pg.psql("SELECT application_name || ':' || state || ':' || sync_state FROM pg_stat_replication "
                   "ORDER BY 1", dbname="postgres").split()
    assert rows == ["n1:streaming:quorum", "n2:streaming:quorum"]
    assert pg.psql("SHOW synchronous_standby_names") == "ANY 2 (n1, n2)"
    assert pg.psql("SHOW synchronous_commit") == "remote_apply"
    # A damaged page is an error when read, on each server (initdb --data-checksums; clones inherit it).
    assert [n.psql("SHOW data_checksums") for n in pg.nodes] == ["on", "on", "on"]
    r = subprocess.run([sys.executable, "-m", "control_plane", "db", "--cluster", str(pg.spec_path), "status"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "problems: none" in r.stdout, r.stdout + r.stderr
    assert "n1=streaming/quorum" in r.stdout and "n2=streaming/quorum" in r.stdout


def _freeze(node: object, sig: int) -> None:
    pid = node.pid()  # type: ignore[attr-defined]
    assert pid
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for p in [pid, *map(int, kids)]:
        os.kill(p, sig)


def test_frozen_standby_makes_writes_fail_by_deadline_not_hang(cl: PgCluster, cca: CAProcess, pki_dir: Path) -> None:
    assert _create(cca, pki_dir, "before-freeze")[0] == grpc.StatusCode.OK
    _freeze(cl.nodes[1], signal.SIGSTOP)
    code, msg, took = _create(cca, pki_dir, "during-freeze")
    assert code == grpc.StatusCode.UNAVAILABLE and "outcome unknown" in msg, (code, msg)
    assert took < 10, f"took {took:.1f}s: writes must end by the 3 s server cap"
    st = status.cluster_status(cl.spec())
    probs = status.problems(cl.spec(), st)
    assert any("n1 is down" in p for p in probs), probs
    # Retrying the same request after the standby thaws applies it once.
    _freeze(cl.nodes[1], signal.SIGCONT)
    cl.wait_synchronous()
    code, _, _ = _create(cca, pki_dir, "during-freeze")
    assert code == grpc.StatusCode.OK  # replayed by request_id, not a duplicate error
    for n in cl.nodes:
        assert _count(n, "during-freeze") == "1"
    assert _create(cca, pki_dir, "after-thaw")[0] == grpc.StatusCode.OK


def test_a_retry_after_an_unknown_outcome_is_acknowledged_only_once_the_standbys_hold_it(
        cl: PgCluster, cca: CAProcess, pki_dir: Path) -> None:
    """The first attempt commits on the primary, its confirmation cancelled at the deadline
    ("outcome unknown"); a retry with the same request_id finds it in request_log but must not
    answer OK while a synchronous standby still lacks it (found by `make chaos`, seed 3: a retry
    acknowledged 6.6 s into a 10.7 s stall of a standby). Both paths: a unit of work's replay
    (CreateOrganization) and the read before a key is generated (RequestIntermediateCsr)."""
    c = clients(cca.addr, pki_dir, "platform-admin")
    assert _create(cca, pki_dir, "has-a-csr")[0] == grpc.StatusCode.OK
    csr = pb.RequestIntermediateCsrRequest(org_id="has-a-csr", algorithm=pb.KEY_ALGORITHM_EC_P256,
                                           request_id="rq-csr-during-freeze")
    _freeze(cl.nodes[1], signal.SIGSTOP)
    try:
        for _ in range(2):  # the first attempt, then a retry that finds it committed on the primary
            code, msg, _t = _create(cca, pki_dir, "during-freeze")
            assert code == grpc.StatusCode.UNAVAILABLE and "outcome unknown" in msg, (code, msg)
            code, msg = code_of(c.admin.RequestIntermediateCsr, csr, timeout=20)
            assert code == grpc.StatusCode.UNAVAILABLE and "outcome unknown" in msg, (code, msg)
        assert cl.primary().psql("SELECT count(*) FROM request_log WHERE request_id IN "
                                 "('rq-during-freeze', 'rq-csr-during-freeze')") == "2"  # committed there
    finally:
        _freeze(cl.nodes[1], signal.SIGCONT)
    cl.wait_synchronous()
    assert _create(cca, pki_dir, "during-freeze")[0] == grpc.StatusCode.OK
    key_id = c.admin.RequestIntermediateCsr(csr, timeout=20).key_id
    for n in cl.nodes:
        assert _count(n, "during-freeze") == "1"
        assert n.psql("SELECT key_id FROM intermediate_keys WHERE org_id = 'has-a-csr'") == key_id


def test_stopped_standby_is_visible_and_catches_up(cl: PgCluster, cca: CAProcess, pki_dir: Path) -> None:
    cl.nodes[2].stop()
    r = subprocess.run([sys.executable, "-m", "control_plane", "db", "--cluster", str(cl.spec_path), "status"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "n2 is down" in r.stdout and "only 1 synchronous standby" in r.stdout, r.stdout
    code, msg, took = _create(cca, pki_dir, "while-n2-down")
    assert code == grpc.StatusCode.UNAVAILABLE and "outcome unknown" in msg and took < 10
    cl.nodes[2].start()
    cl.wait_synchronous()  # it reconnects through its slot and catches up by itself
    wait_for(lambda: _count(cl.nodes[2], "while-n2-down") == "1", 30, "n2 to replay the missed write")
    assert _create(cca, pki_dir, "after-n2-back")[0] == grpc.StatusCode.OK


def test_failover_refusals(cl: PgCluster) -> None:
    spec = cl.spec()
    with pytest.raises(failover.FailoverRefused, match="answers as primary"):
        failover.failover(spec)
    for n in spec.nodes:
        local.kill_node(n)
    with pytest.raises(failover.FailoverRefused, match="only 0 standby"):
        failover.failover(spec)


def test_failover_with_one_required_needs_both_standbys(workdir: Path) -> None:
    c = PgCluster(workdir / "pg-any1", (free_port(), free_port(), free_port()), required_sync=1)
    c.init()
    try:
        assert c.psql("SHOW synchronous_standby_names") == "ANY 1 (n1, n2)"
        spec = c.spec()
        local.kill_node(spec.nodes[0])
        local.kill_node(spec.nodes[1])
        with pytest.raises(failover.FailoverRefused, match="2 are needed"):
            failover.failover(spec)
        c.nodes[1].start()
        rep = failover.failover(spec)
        assert rep.new_primary in ("n1", "n2")
    finally:
        c.destroy()


def test_standby_promoted_behind_our_back(cl: PgCluster, cca: CAProcess, pki_dir: Path) -> None:
    assert _create(cca, pki_dir, "before-rogue")[0] == grpc.StatusCode.OK
    cl.nodes[2].psql("SELECT pg_promote(true, 30)")
    st = status.cluster_status(cl.spec())
    probs = status.problems(cl.spec(), st)
    assert any("SPLIT BRAIN" in p for p in probs), probs
    # Neither primary can acknowledge a write: each needs two standbys it no longer has.
    for i in range(3):
        code, msg, took = _create(cca, pki_dir, f"rogue-{i}")
        assert code == grpc.StatusCode.UNAVAILABLE and took < 10, (code, msg)
    # And a failover refuses to make things worse.
    with pytest.raises(failover.FailoverRefused):
        failover.failover(cl.spec())


def test_wrong_dsn_and_dead_server(pg: PgCluster, pki_dir: Path, master_secret: tuple[bytes, Path],
                                   workdir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARD_")}
    from devstack.stack import ca_env

    env.update(ca_env(pg, pki_dir, master_secret[1], "127.0.0.1:0", ""))
    env["KEYWARD_DB_DSN"] = "host=127.0.0.1 port=5432 = broken"
    r = subprocess.run([sys.executable, "-m", "control_plane", "serve"], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "KEYWARD_DB_DSN is not a valid libpq connection string" in r.stderr, r.stderr
    # A server that refuses connections: the CA starts, says NOT_SERVING, answers UNAVAILABLE promptly.
    dead = free_port()
    ca = start_ca(pg, pki_dir, master_secret[1], workdir / "ca-dead", wait_serving=False,
                  KEYWARD_DB_DSN=f"host=127.0.0.1 port={dead} dbname=keyward user=keyward connect_timeout=2",
                  KEYWARD_MAX_CALL_SECONDS="5")
    try:
        c = clients(ca.addr, pki_dir, "platform-admin")
        t0 = time.monotonic()
        code, msg = code_of(c.admin.CreateOrganization, pb.CreateOrganizationRequest(org_id="nowhere"), timeout=20)
        assert code == grpc.StatusCode.UNAVAILABLE and "database unavailable" in msg, msg
        assert time.monotonic() - t0 < 10
        wait_for(lambda: "health: NOT_SERVING" in ca.log_text(), 15, "NOT_SERVING in the CA log")
        assert ca.proc.poll() is None  # still running: no crash loop
    finally:
        ca.stop()
