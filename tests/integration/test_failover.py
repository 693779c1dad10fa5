"""RPO = 0 across primary crashes, against three real Postgres servers and a
real CA: concurrent admin writes through gRPC, SIGKILL of the primary (all its
processes: a machine crash) at a random moment, `dbops.failover`, and a ledger
check that every acknowledged write is on the new primary and on every standby.

KEYWARD_FAILOVER_CYCLES sets the number of cycles (default 3; `make soak` runs 20).
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg
import pytest

from dbops import failover, local, status
from devstack.pg import PgCluster
from protos.keyward.v1 import keyward_pb2 as pb
from tests.helpers import CAProcess, clients, start_ca, three_servers, wait_for

CYCLES = int(os.environ.get("KEYWARD_FAILOVER_CYCLES", "3"))


@pytest.fixture(scope="module")
def cluster(workdir: Path) -> Iterator[PgCluster]:
    yield from three_servers(workdir / "pg-failover")


@pytest.fixture(scope="module")
def fca(cluster: PgCluster, pki_dir: Path, master_secret: tuple[bytes, Path], workdir: Path) -> Iterator[CAProcess]:
    ca = start_ca(cluster, pki_dir, master_secret[1], workdir / "ca-failover")
    c = clients(ca.addr, pki_dir, "platform-admin")
    c.admin.RegisterZenPool(pb.RegisterZenPoolRequest(pool=pb.ZenPool(
        name="public", visibility=pb.POOL_VISIBILITY_PUBLIC)), timeout=30)
    yield ca
    ca.stop()


@dataclass
class Ledger:
    acked: dict[str, float] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)
    unknown: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _writer(addr: str, pki_dir: Path, ledger: Ledger, stop: threading.Event, prefix: str) -> None:
    c = clients(addr, pki_dir, "platform-admin")
    while not stop.is_set():
        org = f"{prefix}-{uuid.uuid4().hex[:12]}"
        with ledger.lock:
            ledger.started[org] = time.monotonic()
        try:
            c.admin.CreateOrganization(pb.CreateOrganizationRequest(org_id=org, request_id=str(uuid.uuid4())),
                                       timeout=4)
            with ledger.lock:
                ledger.acked[org] = time.monotonic()
        except grpc.RpcError as e:
            definite_failure = e.code() == grpc.StatusCode.UNAVAILABLE and "outcome unknown" not in (e.details() or "")
            with ledger.lock:
                (ledger.failed if definite_failure else ledger.unknown).add(org)
            time.sleep(0.05)  # back off a little while there is no primary


def _max_primaries(spec_nodes: list, stop: threading.Event, out: list[int]) -> None:
    """Poll every server; record the most that ever answered as primary at once."""
    while not stop.is_set():
        n = 0
        for node in spec_nodes:
            try:
                with psycopg.connect(f"host={node.root} port={node.port} dbname=postgres user=postgres "
                                     "connect_timeout=1", autocommit=True) as c:
                    row = c.execute("SELECT pg_is_in_recovery()").fetchone()
                    n += row is not None and not row[0]
            except psycopg.Error:
                pass
        out.append(n)
        time.sleep(0.02)


def _present(node_root: Path, port: int, orgs: list[str]) -> set[str]:
    with psycopg.connect(f"host={node_root} port={port} dbname=keyward user=postgres", autocommit=True) as c:
        rows = c.execute("SELECT org_id FROM organizations WHERE org_id = ANY(%s)", (orgs,)).fetchall()
    return {r[0] for r in rows}


@pytest.fixture(scope="module")
def keyed_org(fca: CAProcess, pki_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.helpers import OrgRoot
    from tests.integration.flow import activate, create_org, org_admin

    org = f"k-{uuid.uuid4().hex[:8]}"
    create_org(clients(fca.addr, pki_dir, "platform-admin"), org)
    activate(org_admin(fca.addr, pki_dir, org), OrgRoot.create(tmp_path_factory.mktemp("root"), org), org)
    return org


def test_rpo_zero_across_primary_crashes(cluster: PgCluster, fca: CAProcess, pki_dir: Path, keyed_org: str) -> None:
    rng = random.Random(int(os.environ.get("KEYWARD_FAILOVER_SEED", "0")) or None)
    zen = clients(fca.addr, pki_dir, "zen-public")
    platform = clients(fca.addr, pki_dir, "platform-admin")
    report = []
    for cycle in range(CYCLES):
        ledger, stop, mon_stop, primaries_seen = Ledger(), threading.Event(), threading.Event(), []
        writers = [threading.Thread(target=_writer, args=(fca.addr, pki_dir, ledger, stop, f"c{cycle}w{i}"), daemon=True)
                   for i in range(4)]
        mon = threading.Thread(target=_max_primaries, args=(cluster.nodes, mon_stop, primaries_seen), daemon=True)
        mon.start()
        for w in writers:
            w.start()
        target = rng.randint(5, 40)  # randomized kill point, in acknowledged writes
        wait_for(lambda: len(ledger.acked) >= target, 60,  # noqa: B023 (polled within this cycle only)
                 f"{target} acknowledged writes before the kill")
        old = cluster.primary()
        spec = cluster.spec()
        old_node = spec.node(old.name)
        local.kill_node(old_node)
        t_kill = time.monotonic()  # every process of the old primary is gone from here on
        # While there is no primary, ZENs still get keys: the CA reads from a
        # standby and spools the KeySent audit event until a primary is back.
        kp = zen.keys.GetKeyPair(pb.GetKeyPairRequest(org_id=keyed_org), timeout=10)
        assert kp.encrypted_private_key and kp.org_id == keyed_org
        sent_during_outage = kp.key_id
        rep = failover.failover(spec)
        wait_for(lambda: sum(ledger.started[o] > t_kill for o in list(ledger.acked)) >= 10, 90,  # noqa: B023 (as above)
                 "ten writes, started after the kill, acknowledged by the new primary")
        first_after = min(t for o, t in ledger.acked.items() if ledger.started[o] > t_kill)
        stop.set()
        for w in writers:
            w.join(15)
        mon_stop.set()
        mon.join(5)
        cluster.wait_synchronous()

        acked = list(ledger.acked)
        new = cluster.primary()
        assert new.name == rep.new_primary != old.name
        for node in cluster.nodes:  # every server, directly: all acknowledged writes are there
            missing = set(acked) - _present(node.root, node.port, acked)
            assert not missing, f"cycle {cycle}: {len(missing)} acknowledged writes missing on {node.name}"
        assert max(primaries_seen) <= 1, "two servers accepted writes at once"
        spooled = (f"SELECT count(*) FROM audit_events WHERE action = 'KeySent' AND key_id = '{sent_during_outage}' "
                   "AND detail LIKE '%spooled%'")
        wait_for(lambda: int(cluster.psql(spooled)) >= cycle + 1, 30,  # noqa: B023 (polled within this cycle only)
                 "the spooled KeySent audit rows")
        unknown_present = len(_present(new.root, new.port, list(ledger.unknown))) if ledger.unknown else 0
        rejoined = ", ".join(f"{k}:{v.split(';')[0]}" for k, v in rep.rejoined.items())
        report.append(f"cycle {cycle}: killed {old.name} after {target} acks, promoted {rep.new_primary} "
                      f"(rejoined {rejoined}); acked={len(acked)} "
                      f"unknown={len(ledger.unknown)} (present {unknown_present}) failed={len(ledger.failed)}; "
                      f"kill->first ack on new primary {first_after - t_kill:.2f}s")
    print("\n" + "\n".join(report))
    # The spooled KeySent/refusal audit rows and the chain survive the failovers.
    st = status.cluster_status(cluster.spec())
    assert not status.problems(cluster.spec(), st), status.render(cluster.spec(), st)
    assert platform.admin.ListZenPools(pb.ListZenPoolsRequest(), timeout=30).pools
