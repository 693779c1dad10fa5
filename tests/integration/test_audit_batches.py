"""KeySent audit rows of concurrent GetKeyPair calls are committed together (group commit),
against the real CA and three Postgres servers:

* 200 concurrent calls: every one answered has its KeySent row, the chain verifies
  (``keyward audit verify``), and the CA committed them in far fewer transactions than calls
  (``keyward_ca_audit_commits_total``);
* with the first transaction held (its row's insert waits for a lock the test holds), all the
  other calls queue behind it and are then written in ONE transaction, none answered before.

The CA here has no audit spool: a row not committed in time is not spooled but waits (within
the call's deadline), so holding a transaction holds its callers. Nothing here asserts a time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import grpc
import psycopg
import pytest

from devstack.pg import PgCluster
from protos.keyward.v1 import keyward_pb2 as pb
from tests.helpers import CAProcess, Clients, OrgRoot, clients, start_ca, wait_for
from tests.integration.flow import activate, create_org, org_admin

ROOT = Path(__file__).resolve().parents[2]
CALLS = 200
HOLD = 0x6B657A32
"""An advisory lock key of this module's own (not the CA's write lock)."""


@pytest.fixture(scope="module")
def unspooled(pg: PgCluster, pki_dir: Path, master_secret: tuple[bytes, Path], workdir: Path,
              platform: Clients) -> Iterator[CAProcess]:
    proc = start_ca(pg, pki_dir, master_secret[1], workdir / "ca-batches", KEYWARD_AUDIT_SPOOL_FILE="")
    yield proc
    proc.stop()


def _metric(ca: CAProcess, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{ca.metrics_port}/metrics", timeout=30) as r:
        text = r.read().decode()
    m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    assert m, f"{name} not among the CA's metrics"
    return float(m.group(1))


def _keysent_rows(pg: PgCluster, org_id: str) -> int:
    return int(pg.psql(f"SELECT count(*) FROM audit_events WHERE action = 'KeySent' AND org_id = '{org_id}'"))


def _verify(pg: PgCluster) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARD_")}
    env["KEYWARD_DB_DSN"] = pg.dsn()
    p = subprocess.run([sys.executable, "-m", "control_plane", "audit", "verify"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "audit chain OK" in p.stdout, p.stdout + p.stderr


def _fire(ca: CAProcess, pki_dir: Path, org_id: str, n: int) -> list[Future[pb.KeyPair]]:
    """``n`` GetKeyPair calls at once, over 8 channels (connections)."""
    chans = [clients(ca.addr, pki_dir, "zen-public", options=[("grpc.use_local_subchannel_pool", 1)])
             for _ in range(8)]
    req = pb.GetKeyPairRequest(org_id=org_id)
    return [chans[i % 8].keys.GetKeyPair.future(req, timeout=60) for i in range(n)]


@pytest.fixture
def keyed_org(ca: CAProcess, platform: Clients, pki_dir: Path, tmp_path: Path, new_org_id: str) -> str:
    create_org(platform, new_org_id)
    activate(org_admin(ca.addr, pki_dir, new_org_id), OrgRoot.create(tmp_path, new_org_id), new_org_id)
    return new_org_id


def test_concurrent_calls_each_have_their_row_in_far_fewer_commits(
    unspooled: CAProcess, pki_dir: Path, pg: PgCluster, keyed_org: str,
) -> None:
    commits0 = _metric(unspooled, "keyward_ca_audit_commits_total")
    calls = _fire(unspooled, pki_dir, keyed_org, CALLS)
    keys = {c.result(timeout=90).key_id for c in calls}  # every call answered
    commits = _metric(unspooled, "keyward_ca_audit_commits_total") - commits0
    assert len(keys) == 1
    assert _keysent_rows(pg, keyed_org) == CALLS  # at once: each call returned after its row committed
    _verify(pg)
    print(f"{CALLS} concurrent GetKeyPair calls: {commits:.0f} audit commits")
    assert commits < CALLS / 2, f"{commits:.0f} audit commits for {CALLS} calls: rows are not grouped"


def test_calls_queued_behind_a_held_commit_are_written_in_one_transaction(
    unspooled: CAProcess, pki_dir: Path, pg: PgCluster, keyed_org: str,
) -> None:
    org = keyed_org
    fn = "test_hold_" + org.replace("-", "_")
    pg.psql(f"CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN "
            f"PERFORM pg_advisory_xact_lock_shared({HOLD}); RETURN NEW; END $f$;"
            f"CREATE TRIGGER {fn} BEFORE INSERT ON audit_events FOR EACH ROW "
            f"WHEN (NEW.action = 'KeySent' AND NEW.org_id = '{org}') EXECUTE FUNCTION {fn}()")
    try:
        with psycopg.connect(pg.admin_dsn(), autocommit=True) as holder:
            holder.execute("SELECT pg_advisory_lock(%s)", (HOLD,))
            try:
                commits0 = _metric(unspooled, "keyward_ca_audit_commits_total")
                calls = _fire(unspooled, pki_dir, org, CALLS)

                def all_queued() -> bool:
                    if any(c.done() for c in calls):
                        return True  # answered while its row cannot have committed: fails below
                    return (_metric(unspooled, "keyward_ca_audit_rows_in_flight")
                            + _metric(unspooled, "keyward_ca_audit_rows_waiting")) >= CALLS
                wait_for(all_queued, 60, "every call's KeySent row to wait for the held transaction", interval=0.2)
                answered_early = [c for c in calls if c.done()]
                first = _metric(unspooled, "keyward_ca_audit_rows_in_flight")
            finally:
                holder.execute("SELECT pg_advisory_unlock(%s)", (HOLD,))
            results = [c.result(timeout=90) for c in calls]
    finally:
        pg.psql(f"DROP TRIGGER IF EXISTS {fn} ON audit_events; DROP FUNCTION IF EXISTS {fn}()")
    assert not answered_early, f"{len(answered_early)} calls answered while their audit rows were held"
    assert all(r.org_id == org for r in results)
    commits = _metric(unspooled, "keyward_ca_audit_commits_total") - commits0
    assert _keysent_rows(pg, org) == CALLS
    # The held transaction (its `first` rows), then everything queued behind it: one more.
    assert first >= 1 and commits == (1 if first == CALLS else 2), (first, commits)
    _verify(pg)


def test_a_call_whose_batch_fails_is_not_answered_with_a_key(
    unspooled: CAProcess, pki_dir: Path, pg: PgCluster, keyed_org: str,
) -> None:
    """Without a spool, a batch the database refuses fails every call in it (UNAVAILABLE), and no
    row of it is left: all or nothing."""
    org = keyed_org
    fn = "test_refuse_" + org.replace("-", "_")
    pg.psql(f"CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN "
            f"RAISE EXCEPTION 'test: the audit log refuses this row'; END $f$;"
            f"CREATE TRIGGER {fn} BEFORE INSERT ON audit_events FOR EACH ROW "
            f"WHEN (NEW.action = 'KeySent' AND NEW.org_id = '{org}') EXECUTE FUNCTION {fn}()")
    try:
        calls = _fire(unspooled, pki_dir, org, 50)
        codes = []
        for c in calls:
            try:
                c.result(timeout=90)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
    finally:
        pg.psql(f"DROP TRIGGER IF EXISTS {fn} ON audit_events; DROP FUNCTION IF EXISTS {fn}()")
    assert set(codes) == {grpc.StatusCode.UNAVAILABLE}, codes
    assert _keysent_rows(pg, org) == 0
    _verify(pg)
