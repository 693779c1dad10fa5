"""Session fixtures: one real Postgres server, dev PKI, a master secret on
tmpfs, and a real CA subprocess on port 0 serving gRPC over mTLS."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack import pki
from devstack.pg import PgCluster
from protos.keyward.v1 import keyward_pb2 as pb
from tests.helpers import CAProcess, Clients, bad_identities, clients, start_ca, three_servers


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="keyward-test-"))
    os.chmod(d, 0o755)  # the postgres user must reach its data directory below
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def pg(workdir: Path) -> Iterator[PgCluster]:
    """A primary and two synchronous hot standbys (ANY 2, remote_apply)."""
    yield from three_servers(workdir / "pg")


@pytest.fixture(scope="session")
def pki_dir(workdir: Path) -> Path:
    d = workdir / "pki"
    pki.init(d)
    for org in ("acme", "globex"):
        pki.org_admin(d, org)
    bad_identities(d)
    return d


@pytest.fixture(scope="session")
def master_secret() -> Iterator[tuple[bytes, Path]]:
    """48 random bytes on tmpfs (/dev/shm), the stand-in for a memory-backed Secret."""
    d = Path(tempfile.mkdtemp(prefix="keyward-test-secret-", dir="/dev/shm"))
    f = d / "master.key"
    secret = os.urandom(48)
    fd = os.open(f, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(secret)
    yield secret, f
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def ca(pg: PgCluster, pki_dir: Path, master_secret: tuple[bytes, Path], workdir: Path) -> Iterator[CAProcess]:
    proc = start_ca(pg, pki_dir, master_secret[1], workdir / "ca")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def platform(ca: CAProcess, pki_dir: Path) -> Clients:
    """The platform admin, with the dev pools 'public' and 'private' registered."""
    c = clients(ca.addr, pki_dir, "platform-admin")
    for name, vis in (("public", pb.POOL_VISIBILITY_PUBLIC), ("private", pb.POOL_VISIBILITY_PRIVATE)):
        c.admin.RegisterZenPool(pb.RegisterZenPoolRequest(pool=pb.ZenPool(name=name, visibility=vis)), timeout=30)
    return c


@pytest.fixture
def new_org_id() -> str:
    return f"o-{uuid.uuid4().hex[:10]}"
