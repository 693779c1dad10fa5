"""A rotation racing a backup, against three real Postgres servers.

A backup's manifest lists the keys it may hold; a backup listing a key that is
no longer live is stale and gets shredded. The base copy (pg_basebackup) takes
a while, and a key may be retired meanwhile: the manifest must then list the
keys live when the backup began as well as those live when it ended, or a
backup holding the retired key is kept. The rotation is made to happen inside
that window deterministically: ``dbops.backup.run`` is wrapped in-process to
rotate just as the real pg_basebackup starts, or just as it has ended."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dbops import backup as dbbackup
from dbops import binaries
from devstack.pg import PgCluster
from protos.keyward.v1 import keyward_pb2 as pb
from tests.helpers import CAProcess, OrgRoot, clients, start_ca_with_public_pool, three_servers
from tests.integration.flow import activate, create_org, org_admin


@pytest.fixture(scope="module")
def rcl(workdir: Path) -> Iterator[PgCluster]:
    yield from three_servers(workdir / "pg-backup-race")


@pytest.fixture(scope="module")
def rca(rcl: PgCluster, pki_dir: Path, master_secret: tuple[bytes, Path], workdir: Path) -> Iterator[CAProcess]:
    ca = start_ca_with_public_pool(rcl, pki_dir, master_secret[1], workdir / "ca-backup-race")
    yield ca
    ca.stop()


def _holds(backup: Path, needle: bytes) -> list[str]:
    return [p.name for p in sorted(backup.rglob("*")) if p.is_file() and needle in p.read_bytes()]


@pytest.mark.parametrize("when", ["as the base copy starts", "as the base copy ends"])
def test_a_key_retired_during_the_base_backup_is_in_its_manifest_and_gets_shredded(
    rcl: PgCluster, rca: CAProcess, pki_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str,
) -> None:
    org = f"r-{uuid.uuid4().hex[:8]}"
    create_org(clients(rca.addr, pki_dir, "platform-admin"), org)
    admin, root = org_admin(rca.addr, pki_dir, org), OrgRoot.create(tmp_path, org)
    activate(admin, root, org)
    old = clients(rca.addr, pki_dir, "zen-public").keys.GetKeyPair(pb.GetKeyPairRequest(org_id=org), timeout=30)
    old_id = old.key_id
    spec = rcl.spec()

    real_run = binaries.run  # what dbops.backup calls as `run`
    rotated: list[str] = []

    def run_racing_a_rotation(tool: str, *args: str, **kw: Any) -> Any:
        if tool != "pg_basebackup":
            return real_run(tool, *args, **kw)
        if when.endswith("starts"):
            rotated.append(activate(admin, root, org)[0].key_id)
            return real_run(tool, *args, **kw)
        done = real_run(tool, *args, **kw)
        rotated.append(activate(admin, root, org)[0].key_id)
        return done

    with monkeypatch.context() as m:
        m.setattr(dbbackup, "run", run_racing_a_rotation)
        raced = dbbackup.backup(spec, log=lambda _: None)
    assert len(rotated) == 1, "the rotation did not run inside the backup"
    new = rotated[0]

    listed = set(json.loads((raced.path / dbbackup.MANIFEST).read_text())["key_ids"])
    assert old_id in listed, (f"the backup taken while key {old_id} was retired ({when}) does not list it: "
                                  f"{sorted(listed)}")
    assert new in listed and raced.key_ids == listed
    if when.endswith("ends"):
        # Positive control: the copy was made while the old key was live, so it holds its bytes.
        sealed = old.encrypted_private_key
        assert _holds(raced.path, sealed[len(sealed) // 2: len(sealed) // 2 + 48])

    # Hence the agent's reconcile treats it as stale: a clean backup is taken, the raced one shredded.
    dbbackup.reconcile(spec)
    assert not raced.path.exists(), "the backup holding a retired key was kept"
    newest = dbbackup.list_backups(spec)[-1]
    assert new in newest.key_ids and old_id not in newest.key_ids
