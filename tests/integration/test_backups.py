"""Backups that forget retired keys, against three real Postgres servers.

After a rotation and a revocation, the backup agent leaves no backup holding
the retired key's ciphertext or certificate (every backup file is scanned byte
for byte), while the newest backup holds every active key (positive control),
restores into a fresh server, and serves a key that a ZEN opens. The retired
rows are gone on all three live servers, checked on each one directly. A restore
listens on 127.0.0.1 whatever address its source listened on."""

from __future__ import annotations

import base64
import dataclasses
import shutil
import socket
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from data_plane.keyopen import open_org_key
from dbops import backup as dbbackup
from dbops.binaries import run as pgrun
from devstack.pg import PgCluster, free_port
from keylib.master import MasterSecret
from protos.keyward.v1 import keyward_pb2 as pb
from tests.helpers import CAProcess, OrgRoot, clients, start_ca, start_ca_with_public_pool, three_servers, wait_for
from tests.integration.flow import activate, create_org, org_admin

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bcl(workdir: Path) -> Iterator[PgCluster]:
    yield from three_servers(workdir / "pg-backups")


@pytest.fixture(scope="module")
def bca(bcl: PgCluster, pki_dir: Path, master_secret: tuple[bytes, Path], workdir: Path) -> Iterator[CAProcess]:
    ca = start_ca_with_public_pool(bcl, pki_dir, master_secret[1], workdir / "ca-backups")
    yield ca
    ca.stop()


def _db(cluster: PgCluster, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "control_plane", "db", "--cluster", str(cluster.spec_path), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _artifacts(cluster: PgCluster) -> list[Path]:
    return [p for p in Path(cluster.spec().backup_dir).rglob("*") if p.is_file()]


def _needles(kp: pb.KeyPair) -> dict[str, bytes]:
    cert = x509.load_pem_x509_certificate(kp.certificate_pem.encode())
    der = cert.public_bytes(serialization.Encoding.DER)
    return {"ciphertext": kp.encrypted_private_key[:64], "ciphertext tail": kp.encrypted_private_key[-64:],
            "certificate PEM line": _pem_line_of_public_key(kp.certificate_pem, cert, der).encode(),
            "certificate DER": der[200:264]}


def _pem_line_of_public_key(pem: str, cert: x509.Certificate, der: bytes) -> str:
    """The certificate's PEM line that encodes the middle of its public key (SPKI): unique to this
    key. (A fixed line such as the 4th holds the validity and the subject, the same for two
    certificates of one org signed in the same second.)"""
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    at = der.index(spki) + len(spki) // 2
    lines = [ln for ln in pem.strip().splitlines() if not ln.startswith("-----")]
    assert all(len(ln) == 64 for ln in lines[:-1]), "PEM lines of 64 characters (48 bytes each)"
    return lines[at // 48]


def _hits(paths: list[Path], needles: dict[str, bytes]) -> dict[str, list[str]]:
    """Which needles occur in which files (for a tar, also which member)."""
    out: dict[str, list[str]] = {}
    for p in paths:
        data = p.read_bytes()
        for name, n in needles.items():
            if n in data:
                where = p.name
                if p.suffix == ".tar":
                    with tarfile.open(p) as t:
                        for m in t.getmembers():
                            f = t.extractfile(m) if m.isfile() else None
                            if f is not None and n in f.read():
                                where += f":{m.name}"
                out.setdefault(name, []).append(where)
    return out


def test_backups_forget_retired_keys_and_restore(
    bcl: PgCluster, bca: CAProcess, pki_dir: Path, master_secret: tuple[bytes, Path], workdir: Path,
    tmp_path: Path,
) -> None:
    platform = clients(bca.addr, pki_dir, "platform-admin")
    zen = clients(bca.addr, pki_dir, "zen-public")
    a, b = f"a-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
    for org in (a, b):
        create_org(platform, org)
    admin_a, admin_b = org_admin(bca.addr, pki_dir, a), org_admin(bca.addr, pki_dir, b)
    root_a, root_b = OrgRoot.create(tmp_path, a), OrgRoot.create(tmp_path, b)
    activate(admin_a, root_a, a)
    activate(admin_b, root_b, b)
    old_a = zen.keys.GetKeyPair(pb.GetKeyPairRequest(org_id=a), timeout=30)
    old_b = zen.keys.GetKeyPair(pb.GetKeyPairRequest(org_id=b), timeout=30)

    r = _db(bcl, "backup")
    assert r.returncode == 0, r.stderr
    first = dbbackup.list_backups(bcl.spec())
    assert len(first) == 1 and {old_a.key_id, old_b.key_id} <= first[0].key_ids
    assert _hits(_artifacts(bcl), _needles(old_a)), "positive control: the first backup holds a's key"

    agent = subprocess.Popen([sys.executable, "-m", "control_plane", "db", "--cluster", str(bcl.spec_path),
                              "backup-agent", "--interval", "0.5"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        # Rotation of a, revocation of b.
        activate(admin_a, root_a, a)
        admin_b.admin.RevokeIntermediate(pb.RevokeIntermediateRequest(org_id=b, key_id=old_b.key_id), timeout=30)
        new_a = zen.keys.GetKeyPair(pb.GetKeyPairRequest(org_id=a), timeout=30)
        assert new_a.key_id != old_a.key_id

        def clean() -> bool:
            bs = dbbackup.list_backups(bcl.spec())
            busy = any(Path(bcl.spec().backup_dir).glob("shredding-*"))
            return bool(bs) and not busy and all(not ({old_a.key_id, old_b.key_id} & x.key_ids) for x in bs) \
                and new_a.key_id in bs[-1].key_ids
        wait_for(clean, 120, "the backup agent to re-backup and shred stale backups")
    finally:
        agent.terminate()
        out = agent.communicate(timeout=30)[0]
    assert "shredded" in out and "took" in out, (out, agent.returncode)

    # Byte-for-byte scan of every backup artifact.
    arts = _artifacts(bcl)
    assert arts and any(p.name == "base.tar" for p in arts)
    for kp in (old_a, old_b):
        hits = _hits(arts, _needles(kp))
        assert not hits, f"retired key {kp.key_id} of {kp.org_id} found in backup files: {hits}"
    assert _hits(arts, _needles(new_a)), "positive control: the newest backup holds the active key"

    # The live servers: the retired rows are gone on each of the three.
    for node in bcl.nodes:
        n = node.psql(f"SELECT count(*) FROM intermediate_keys WHERE key_id IN ('{old_a.key_id}', '{old_b.key_id}')")
        assert n == "0", f"{node.name} still holds a retired key row"

    # Restore the newest backup into a fresh server; a ZEN uses a key from it.
    newest = dbbackup.list_backups(bcl.spec())[-1]
    rdir, rport = workdir / f"restored-{uuid.uuid4().hex[:6]}", free_port()
    r = _db(bcl, "restore", str(newest.path), str(rdir), str(rport))
    assert r.returncode == 0, r.stdout + r.stderr
    restored = PgCluster(rdir, (rport, 0, 0))
    restored.nodes = restored.nodes[:1]
    try:
        dsn = f"host=127.0.0.1 port={rport} dbname=keyward user=keyward passfile={bcl.passfile} connect_timeout=3"
        rca = start_ca(bcl, pki_dir, master_secret[1], workdir / "ca-restored", KEYWARD_DB_DSN=dsn)
        try:
            kp = clients(rca.addr, pki_dir, "zen-public").keys.GetKeyPair(pb.GetKeyPairRequest(org_id=a), timeout=30)
            assert kp.key_id == new_a.key_id
            master = MasterSecret.from_bytes(master_secret[0])
            buf = open_org_key(master, org_id=a, key_id=kp.key_id, keylib_format=kp.keylib_format,
                               sealed=kp.encrypted_private_key, certificate_pem=kp.certificate_pem)
            key = serialization.load_der_private_key(buf.view, None)
            f = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            cert = x509.load_pem_x509_certificate(kp.certificate_pem.encode())
            assert key.public_key().public_bytes(*f) == cert.public_key().public_bytes(*f)
            buf.wipe()
            master.wipe()
        finally:
            rca.stop()
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", "true"], check=False)
        from dbops.binaries import run as pgrun
        pgrun("pg_ctl", "stop", "-D", str(rdir / "data"), "-m", "immediate", "-w", check=False)
    _ = base64  # (kept for debugging dumps)


ELSEWHERE = "10.255.255.1"
"""An address of no interface here: a server in a network namespace of its own listens on its
veth address, which the host restoring its backup does not have."""


def test_restore_listens_on_loopback_whatever_its_source_listened_on(bcl: PgCluster, bca: CAProcess,
                                                                    workdir: Path) -> None:
    """(``bca``: the CA creates the schema a backup reads.)"""
    with socket.socket() as s:
        try:
            s.bind((ELSEWHERE, 0))
        except OSError:
            pass  # as expected: not an address of this host
        else:
            pytest.skip(f"{ELSEWHERE} is an address of this host: the test needs one that is not")
    # A backup directory of its own: the other test counts the backups in the spec's.
    spec = dataclasses.replace(bcl.spec(), backup_dir=str(workdir / f"backups-listen-{uuid.uuid4().hex[:6]}"))
    primary = bcl.primary()
    # In the source's postgresql.auto.conf (so in its base backup), not applied: a restart would need it.
    primary.psql(f"ALTER SYSTEM SET listen_addresses = '{ELSEWHERE}'", dbname="postgres")
    try:
        b = dbbackup.backup(spec)
    finally:
        primary.psql("ALTER SYSTEM SET listen_addresses = '127.0.0.1'", dbname="postgres")
    with tarfile.open(b.path / "base.tar") as t:
        member = t.extractfile("postgresql.auto.conf")
        assert member is not None
        assert ELSEWHERE in member.read().decode(), "precondition: the backup's config names the other address"

    rdir, rport = workdir / f"restored-listen-{uuid.uuid4().hex[:6]}", free_port()
    try:
        node = dbbackup.restore(b.path, rdir, rport)
        assert (node.host, node.port) == ("127.0.0.1", rport)
        with psycopg.connect(spec.conninfo(node), autocommit=True) as c:  # over TCP, at the node's host
            assert c.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
            assert c.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
    finally:
        pgrun("pg_ctl", "stop", "-D", str(rdir / "data"), "-m", "immediate", "-w", "-t", "30", check=False)
        shutil.rmtree(rdir, ignore_errors=True)


def test_a_key_activated_after_the_newest_backup_is_backed_up_again(bcl: PgCluster, bca: CAProcess, pki_dir: Path,
                                                                    workdir: Path) -> None:
    """The newest backup was current by key ids alone: taken while an org's first key was
    pending, it still "held every live key" once the key was activated, and a restore gave the
    org a pending key with no certificate (found by the fault campaign's restore check)."""
    spec = dataclasses.replace(bcl.spec(), backup_dir=str(workdir / f"backups-states-{uuid.uuid4().hex[:6]}"))
    platform = clients(bca.addr, pki_dir, "platform-admin")
    org = f"st-{uuid.uuid4().hex[:6]}"
    create_org(platform, org)
    admin = org_admin(bca.addr, pki_dir, org)
    csr = admin.admin.RequestIntermediateCsr(pb.RequestIntermediateCsrRequest(org_id=org), timeout=60)
    dbbackup.reconcile(spec)
    before = dbbackup.list_backups(spec)[-1]
    key_id = csr.key_id
    assert dict(before.key_states)[key_id] == "pending"
    root = OrgRoot.create(workdir / f"root-{org}", org)
    admin.admin.UploadIntermediateCertificate(pb.UploadIntermediateCertificateRequest(
        org_id=org, certificate_pem=root.sign(csr.csr_pem), chain_pem=root.crt.read_text()), timeout=30)
    did = dbbackup.reconcile(spec)
    assert "took a new backup (newest held a key in another state)" in did, did
    after = dbbackup.list_backups(spec)[-1]
    assert after.path != before.path and dict(after.key_states)[key_id] == "active"
    assert dbbackup.reconcile(spec) == []  # current now: nothing more to do
