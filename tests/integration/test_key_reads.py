"""GetKeyPair while a server answers nothing, against three real Postgres servers and a real CA:
a ZEN gets the right key within its own deadline (5 s, data_plane.ca_client) whenever a server
that holds the key answers, and no key older than it asked for. Found by `make chaos` (ZEN reads
that missed their deadline while a server was SIGSTOPped): a cancelled query against a frozen
server ends only once psycopg has given up on its cancel request, so the read, the fall-back to
the primary and the KeySent audit each waited out the stuck server (control_plane/store/tx.py,
control_plane/spool.py).

A frozen server (SIGSTOP of the postmaster and its processes) still accepts TCP connections and
answers nothing, as one cut off does, until the test thaws it. The servers are listed n0 (the
primary), n1, n2 in the CA's DSN; key reads go to a standby first.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import grpc
import pytest

from devstack.pg import PgCluster, PgServer, free_port
from protos.keyward.v1 import keyward_pb2 as pb
from tests.helpers import CAProcess, Clients, OrgRoot, clients, start_ca_with_public_pool, wait_for
from tests.integration.flow import activate, create_org, org_admin

ZEN_DEADLINE = 5.0
"""The ZEN's own deadline for GetKeyPair (data_plane.ca_client): each read below is bounded by it."""


@pytest.fixture(scope="module")
def cluster(workdir: Path) -> Iterator[PgCluster]:
    c = PgCluster(workdir / f"pg-reads-{uuid.uuid4().hex[:6]}", (free_port(), free_port(), free_port()))
    c.init()
    yield c
    for n in c.nodes:  # a failed test may have left one frozen
        _signal(n, signal.SIGCONT)
    c.destroy()


@pytest.fixture(scope="module")
def rca(cluster: PgCluster, pki_dir: Path, master_secret: tuple[bytes, Path], workdir: Path
        ) -> Iterator[CAProcess]:
    ca = start_ca_with_public_pool(cluster, pki_dir, master_secret[1], workdir / "ca-reads")
    yield ca
    ca.stop()


def _signal(node: PgServer, sig: int) -> None:
    pid = node.pid()
    if pid is None:
        return
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for p in [pid, *map(int, kids)]:  # the postmaster first: it forks nothing more
        with suppress(ProcessLookupError):
            os.kill(p, sig)


@contextmanager
def frozen(node: PgServer) -> Iterator[None]:
    _signal(node, signal.SIGSTOP)
    try:
        yield
    finally:
        _signal(node, signal.SIGCONT)


def _org_with_key(ca: CAProcess, pki_dir: Path, tmp_path: Path, prefix: str) -> tuple[str, str]:
    org = f"{prefix}-{uuid.uuid4().hex[:8]}"
    create_org(clients(ca.addr, pki_dir, "platform-admin"), org)
    csr, _, _ = activate(org_admin(ca.addr, pki_dir, org), OrgRoot.create(tmp_path, org), org)
    return org, csr.key_id


def _read(zen: Clients, org: str, min_version: int = 0) -> pb.KeyPair:
    kp: pb.KeyPair = zen.keys.GetKeyPair(pb.GetKeyPairRequest(org_id=org, min_version=min_version),
                                         timeout=ZEN_DEADLINE)
    return kp


def _keysent_rows(primary: PgServer, org: str) -> int:
    return int(primary.psql(f"SELECT count(*) FROM audit_events WHERE action = 'KeySent' AND org_id = '{org}'"))


def test_a_lagging_standby_and_a_frozen_primary_leave_the_key_to_the_other_standby(
        cluster: PgCluster, rca: CAProcess, pki_dir: Path, tmp_path: Path) -> None:
    """n1 (asked first) has not replayed a rotation that n2 holds; the primary is frozen. A ZEN that
    asks for the new version gets it from n2, not the old key from n1, nor a deadline waiting for
    the primary (the fall-back of a lagging read)."""
    primary, n1, n2 = cluster.primary(), cluster.nodes[1], cluster.nodes[2]
    assert primary is cluster.nodes[0]
    org, first = _org_with_key(rca, pki_dir, tmp_path, "lag")
    zen = clients(rca.addr, pki_dir, "zen-public")
    assert _read(zen, org).key_id == first
    admin, root = org_admin(rca.addr, pki_dir, org), OrgRoot.create(tmp_path, org)
    csr = admin.admin.RequestIntermediateCsr(pb.RequestIntermediateCsrRequest(org_id=org), timeout=30)
    n1.psql("SELECT pg_wal_replay_pause()", dbname="postgres")
    try:
        try:  # waits for n1 to apply it (ANY 2): an unknown outcome at its deadline, applied on n2
            admin.admin.UploadIntermediateCertificate(pb.UploadIntermediateCertificateRequest(
                org_id=org, certificate_pem=root.sign(csr.csr_pem), chain_pem=root.crt.read_text()), timeout=3)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE and "outcome unknown" in (e.details() or ""), e
        active = f"SELECT key_id || ':' || version FROM intermediate_keys WHERE org_id = '{org}' AND state = 'active'"
        wait_for(lambda: n2.psql(active) == f"{csr.key_id}:2", 15, "n2 to hold the rotated key")
        assert n1.psql(active) == f"{first}:1"
        with frozen(primary):
            for _ in range(3):
                kp = _read(zen, org, min_version=2)
                assert (kp.key_id, kp.version) == (csr.key_id, 2)
    finally:
        n1.psql("SELECT pg_wal_replay_resume()", dbname="postgres")
    cluster.wait_synchronous()
    wait_for(lambda: _keysent_rows(primary, org) >= 4, 30, "a KeySent audit row for every key sent")


def test_keys_are_sent_while_the_primary_is_frozen(cluster: PgCluster, rca: CAProcess, pki_dir: Path,
                                                   tmp_path: Path) -> None:
    """Read from a standby; the KeySent event, which the frozen primary cannot take, is spooled
    and reaches the audit log once the primary is back."""
    primary = cluster.primary()
    org, key_id = _org_with_key(rca, pki_dir, tmp_path, "fp")
    zen = clients(rca.addr, pki_dir, "zen-public")
    assert _read(zen, org).key_id == key_id
    with frozen(primary):
        for _ in range(3):
            assert _read(zen, org).key_id == key_id
    wait_for(lambda: _keysent_rows(primary, org) >= 4, 30, "a KeySent audit row for every key sent")


@pytest.mark.parametrize("standby", [1, 2])
def test_keys_are_sent_while_a_standby_is_frozen(cluster: PgCluster, rca: CAProcess, pki_dir: Path,
                                                 tmp_path: Path, standby: int) -> None:
    """Either standby, the one key reads go to first among them (n1); commits wait for the frozen
    one meanwhile (ANY 2), so the KeySent events are spooled too."""
    primary = cluster.primary()
    org, key_id = _org_with_key(rca, pki_dir, tmp_path, f"fs{standby}")
    zen = clients(rca.addr, pki_dir, "zen-public")
    assert _read(zen, org).key_id == key_id
    with frozen(cluster.nodes[standby]):
        for _ in range(3):
            assert _read(zen, org).key_id == key_id
    cluster.wait_synchronous()
    wait_for(lambda: _keysent_rows(primary, org) >= 4, 30, "a KeySent audit row for every key sent")


def test_keys_are_sent_while_the_primary_and_the_first_standby_are_frozen(
        cluster: PgCluster, rca: CAProcess, pki_dir: Path, tmp_path: Path) -> None:
    """Two servers answer nothing; the third (n2, asked after n1) holds the key and answers."""
    primary = cluster.primary()
    org, key_id = _org_with_key(rca, pki_dir, tmp_path, "f2")
    zen = clients(rca.addr, pki_dir, "zen-public")
    assert _read(zen, org).key_id == key_id
    with frozen(primary), frozen(cluster.nodes[1]):
        for _ in range(3):
            assert _read(zen, org).key_id == key_id
    cluster.wait_synchronous()
    wait_for(lambda: _keysent_rows(primary, org) >= 4, 30, "a KeySent audit row for every key sent")
