"""Key material never reaches a disk, a log or an audit row: proved by scanning.

Needles: the org private key (PKCS#8 DER, its PEM body, its hex), the master
secret, and the derived AES key (the seed's "password"). Haystacks: every
table of the database, every file of the Postgres data directory (WAL
included, after a checkpoint and WAL switch), the Postgres server log, the CA's
log, and the audit rows."""

from __future__ import annotations

import base64
from pathlib import Path

from devstack.pg import PgCluster
from keylib.envelope import decode
from keylib.kdf import derive_password
from keylib.master import MasterSecret
from keylib.unwrap import open_sealed
from protos.keyward.v1 import keyward_pb2 as pb
from tests.helpers import CAProcess, Clients, OrgRoot, clients
from tests.integration.flow import activate, create_org, org_admin


def _needles(kp: pb.KeyPair, secret: bytes) -> dict[str, bytes]:
    master = MasterSecret.from_bytes(secret)
    buf = open_sealed(master, kp.encrypted_private_key, org_id=kp.org_id, key_id=kp.key_id,
                      spki_sha256=bytes.fromhex(kp.public_key_sha256))
    der = bytes(buf.view)
    buf.wipe()
    pw = derive_password(master, decode(kp.encrypted_private_key).salt, kp.org_id, kp.key_id)
    password = bytes(pw.view)
    pw.wipe()
    master.wipe()
    pem_body = base64.b64encode(der)
    return {
        "key DER (first 48 bytes)": der[:48],
        "key DER (middle 48 bytes)": der[len(der) // 2: len(der) // 2 + 48],
        "key PEM line": pem_body[64:128],
        "key hex": der[100:148].hex().encode(),
        "master secret": secret,
        "master secret hex": secret.hex().encode(),
        "derived password": password,
        "derived password hex": password.hex().encode(),
    }


def _scan(data: bytes, needles: dict[str, bytes]) -> list[str]:
    return [name for name, n in needles.items() if n in data]


def test_no_key_material_in_database_files_logs_or_audit(
    ca: CAProcess, platform: Clients, pki_dir: Path, pg: PgCluster, master_secret: tuple[bytes, Path],
    tmp_path: Path, new_org_id: str,
) -> None:
    create_org(platform, new_org_id)
    admin = org_admin(ca.addr, pki_dir, new_org_id)
    root = OrgRoot.create(tmp_path, new_org_id)
    zen = clients(ca.addr, pki_dir, "zen-public")
    activate(admin, root, new_org_id)
    retired = zen.keys.GetKeyPair(pb.GetKeyPairRequest(org_id=new_org_id), timeout=30)
    activate(admin, root, new_org_id)  # a rotation: the first key passed through and was retired
    kp = zen.keys.GetKeyPair(pb.GetKeyPairRequest(org_id=new_org_id), timeout=30)
    assert kp.key_id != retired.key_id
    needles = _needles(kp, master_secret[0])
    needles.update({f"retired {k}": v for k, v in _needles(retired, master_secret[0]).items()
                    if not k.startswith("master")})
    assert kp.encrypted_private_key  # the haystacks hold the sealed key; the needles must not appear

    # 1. Every table, as text (bytea shows as hex, so the hex needles cover it).
    tables = pg.psql("SELECT tablename FROM pg_tables WHERE schemaname='public'").split()
    assert "intermediate_keys" in tables and "audit_events" in tables
    for t in tables:
        dump = pg.psql(f"COPY (SELECT * FROM {t}) TO STDOUT").encode()
        assert not _scan(dump, needles), f"table {t} holds {_scan(dump, needles)}"
        assert b"PRIVATE KEY" not in dump

    # 2. Every file of all three data directories, WAL included, once flushed.
    pg.psql("CHECKPOINT")
    pg.psql("SELECT pg_switch_wal()")
    for node in pg.nodes:
        if node is not pg.primary():
            node.psql("CHECKPOINT")  # a restartpoint on the standby
    scanned = 0
    sealed_hits = 0
    for node in pg.nodes:
        files = [p for p in node.datadir.rglob("*") if p.is_file()]
        assert any("pg_wal" in p.parts for p in files), f"no WAL files found to scan on {node.name}"
        for p in files + [node.logfile]:
            try:
                data = p.read_bytes()
            except (FileNotFoundError, PermissionError):
                continue  # a temp file that went away mid-scan
            scanned += len(data)
            assert not _scan(data, needles), f"{p} holds {_scan(data, needles)}"
            sealed_hits += kp.encrypted_private_key[:48] in data
    # The sealed key itself did reach every server (so the scan looked at real data).
    assert sealed_hits >= 3
    assert scanned > 30 << 20

    # 3. The CA's log: JSON lines, and no secret.
    log = ca.log.read_bytes()
    assert not _scan(log, needles)
    assert b"PRIVATE KEY" not in log
