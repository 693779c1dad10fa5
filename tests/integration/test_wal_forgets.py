"""A retired key's sealed bytes leave every server's pg_wal, standbys included.

Deleting a row leaves its bytes in the WAL that carried it (the INSERT, full-page
images) until a checkpoint removes the segment. A CHECKPOINT on the primary does
not clear a standby: each standby removes WAL only at its own restartpoint. So
after a retirement both mechanisms, the CA (by itself, in the background) and
the backup agent, must checkpoint the primary and then each standby. Proof: the
retired key's sealed bytes are first seen in pg_wal (positive control), then
found in no file under any node's pg_wal within a bounded wait."""

from __future__ import annotations

import uuid
from pathlib import Path

from dbops import backup as dbbackup
from devstack.pg import PgCluster
from protos.keyward.v1 import keyward_pb2 as pb
from tests.helpers import CAProcess, Clients, OrgRoot, clients, wait_for
from tests.integration.flow import activate, create_org, org_admin


def _needle(kp: pb.KeyPair) -> bytes:
    """48 bytes from the middle of the sealed key: ciphertext, found nowhere else."""
    sealed = kp.encrypted_private_key
    assert len(sealed) >= 96
    return sealed[len(sealed) // 2: len(sealed) // 2 + 48]


def _wal_hits(pg: PgCluster, needle: bytes) -> dict[str, list[str]]:
    """node name -> the pg_wal files (archive_status and all) holding ``needle``."""
    out: dict[str, list[str]] = {}
    for node in pg.nodes:
        for p in sorted((node.datadir / "pg_wal").rglob("*")):
            try:
                if p.is_file() and needle in p.read_bytes():
                    out.setdefault(node.name, []).append(p.name)
            except FileNotFoundError:
                continue  # removed while we looked: that is the point
    return out


def _wait_wal_clean(pg: PgCluster, needle: bytes, what: str, timeout: float = 60, ca: CAProcess | None = None
                    ) -> None:
    last: dict[str, list[str]] = {}

    def clean() -> bool:
        nonlocal last
        last = _wal_hits(pg, needle)
        return not last
    try:
        wait_for(clean, timeout, what, interval=0.2)
    except AssertionError as e:
        said = [ln for ln in ca.log_text().splitlines() if "WAL clean-up" in ln] if ca else []
        raise AssertionError(f"{e}: the retired key's sealed bytes are still in pg_wal: {last}; "
                             f"the CA said: {said[-5:]}") from None


def _org_with_key(ca: CAProcess, platform: Clients, pki_dir: Path, tmp_path: Path
                  ) -> tuple[str, Clients, OrgRoot, Clients, pb.KeyPair]:
    org = f"w-{uuid.uuid4().hex[:10]}"
    create_org(platform, org)
    admin = org_admin(ca.addr, pki_dir, org)
    root = OrgRoot.create(tmp_path, org)
    zen = clients(ca.addr, pki_dir, "zen-public")
    activate(admin, root, org)
    return org, admin, root, zen, zen.keys.GetKeyPair(pb.GetKeyPairRequest(org_id=org), timeout=30)


def test_rotation_clears_the_retired_key_from_every_nodes_wal(
    ca: CAProcess, platform: Clients, pki_dir: Path, pg: PgCluster, tmp_path: Path,
) -> None:
    org, admin, root, zen, retired = _org_with_key(ca, platform, pki_dir, tmp_path)
    needle = _needle(retired)
    seen = _wal_hits(pg, needle)
    assert set(seen) == {n.name for n in pg.nodes}, f"positive control: every node's WAL carried the key: {seen}"

    activate(admin, root, org)  # the rotation retires (deletes) the first key
    kp = zen.keys.GetKeyPair(pb.GetKeyPairRequest(org_id=org), timeout=30)
    assert kp.key_id != retired.key_id
    _wait_wal_clean(pg, needle, "the CA to checkpoint the primary and both standbys after the rotation", ca=ca)


def test_backup_agent_clears_the_retired_key_from_every_nodes_wal(
    ca: CAProcess, platform: Clients, pki_dir: Path, pg: PgCluster, tmp_path: Path,
) -> None:
    """A retirement whose CA never got to its own clean-up (it died after the commit): deleted
    here directly in SQL, so only the backup agent acts on it."""
    _org, _admin, _root, _zen, retired = _org_with_key(ca, platform, pki_dir, tmp_path)
    needle = _needle(retired)
    assert _wal_hits(pg, needle), "positive control: the key's sealed bytes are in pg_wal"
    pg.psql(f"DELETE FROM intermediate_keys WHERE key_id = '{retired.key_id}'")
    b = dbbackup.backup(pg.spec())
    try:
        assert retired.key_id not in b.key_ids
        _wait_wal_clean(pg, needle, "the backup to checkpoint the primary and both standbys", timeout=30)
    finally:
        dbbackup.shred(b.path)
