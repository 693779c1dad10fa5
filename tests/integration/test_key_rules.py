"""Rules of key custody that each guard against one way of getting it wrong,
against the real CA and Postgres:

* a key is never sent before its KeySent audit row has committed (without an
  audit spool, a key whose sending cannot be audited is not sent at all);
* no commit ever leaves an org with two active keys (the partial unique index,
  and a rotation that retires the old key in the transaction that activates
  the new one, observed while the rotation is held at the old key's row);
* a retried RequestIntermediateCsr (same request_id) is answered with the
  same pending key, not a new one that discards it;
* an org admin can neither revoke nor upload for another org.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import psycopg
import pytest

from devstack.pg import PgCluster
from protos.keyward.v1 import keyward_pb2 as pb
from tests.helpers import CAProcess, Clients, OrgRoot, clients, code_of, start_ca, table_snapshot, wait_for
from tests.integration.flow import activate, create_org, org_admin

PD = grpc.StatusCode.PERMISSION_DENIED
HOLD = 0x6B657A31
"""An advisory lock key of this module's own (not the CA's write lock)."""


@pytest.fixture(scope="module")
def unspooled(pg: PgCluster, pki_dir: Path, master_secret: tuple[bytes, Path], workdir: Path,
              platform: Clients) -> Iterator[CAProcess]:
    """A second CA on the same database without an audit spool (KEYWARD_AUDIT_SPOOL_FILE empty):
    a key whose sending cannot be audited at once is not sent."""
    proc = start_ca(pg, pki_dir, master_secret[1], workdir / "ca-unspooled", KEYWARD_AUDIT_SPOOL_FILE="")
    yield proc
    proc.stop()


@contextmanager
def _keysent_trigger(pg: PgCluster, org_id: str, body: str) -> Iterator[None]:
    """Run ``body`` (PL/pgSQL) before every KeySent audit row of ``org_id`` is inserted;
    installed as the postgres superuser, removed afterwards."""
    name = "test_keysent_" + org_id.replace("-", "_")
    pg.psql(f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN {body} RETURN NEW; END $f$;"
            f"CREATE TRIGGER {name} BEFORE INSERT ON audit_events FOR EACH ROW "
            f"WHEN (NEW.action = 'KeySent' AND NEW.org_id = '{org_id}') EXECUTE FUNCTION {name}()")
    try:
        yield
    finally:
        pg.psql(f"DROP TRIGGER IF EXISTS {name} ON audit_events; DROP FUNCTION IF EXISTS {name}()")


def _keysent_rows(pg: PgCluster, org_id: str) -> list[str]:
    return pg.psql(f"SELECT key_id FROM audit_events WHERE action = 'KeySent' AND org_id = '{org_id}' "
                   "ORDER BY seq").split()


def _org_with_key(ca: CAProcess, platform: Clients, pki_dir: Path, tmp_path: Path, org_id: str
                  ) -> tuple[Clients, OrgRoot, str]:
    create_org(platform, org_id)
    admin = org_admin(ca.addr, pki_dir, org_id)
    root = OrgRoot.create(tmp_path, org_id)
    csr, _, _ = activate(admin, root, org_id)
    return admin, root, csr.key_id


# ------------------------------------------------------------- KeySent audit

def test_without_a_spool_a_key_whose_audit_fails_is_not_sent(
    ca: CAProcess, unspooled: CAProcess, platform: Clients, pki_dir: Path, pg: PgCluster, tmp_path: Path,
    new_org_id: str,
) -> None:
    _, _, key_id = _org_with_key(ca, platform, pki_dir, tmp_path, new_org_id)
    zen = clients(unspooled.addr, pki_dir, "zen-public")
    with _keysent_trigger(pg, new_org_id, "RAISE EXCEPTION 'test: the audit log refuses this row';"):
        code, msg = code_of(zen.keys.GetKeyPair, pb.GetKeyPairRequest(org_id=new_org_id))
    assert code == grpc.StatusCode.UNAVAILABLE and "key is not sent" in msg, (code, msg)
    assert _keysent_rows(pg, new_org_id) == []
    # Positive control: the audit log accepts the row again, and the key goes out with it.
    assert zen.keys.GetKeyPair(pb.GetKeyPairRequest(org_id=new_org_id), timeout=30).key_id == key_id
    assert _keysent_rows(pg, new_org_id) == [key_id]


def test_get_key_pair_answers_only_after_its_keysent_row_committed(
    ca: CAProcess, unspooled: CAProcess, platform: Clients, pki_dir: Path, pg: PgCluster, tmp_path: Path,
    new_org_id: str,
) -> None:
    """The normal case: the row is there when the call returns (read at once, no waiting). To make
    "before" observable, the KeySent row's insert is held (a trigger waits for a lock the test holds):
    the call must not have answered while its audit row waits."""
    _, _, key_id = _org_with_key(ca, platform, pki_dir, tmp_path, new_org_id)
    zen = clients(unspooled.addr, pki_dir, "zen-public")
    assert zen.keys.GetKeyPair(pb.GetKeyPairRequest(org_id=new_org_id), timeout=30).key_id == key_id
    assert _keysent_rows(pg, new_org_id) == [key_id]

    with _keysent_trigger(pg, new_org_id, f"PERFORM pg_advisory_xact_lock_shared({HOLD});"), \
            psycopg.connect(pg.admin_dsn(), autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (HOLD,))
        try:
            call = zen.keys.GetKeyPair.future(pb.GetKeyPairRequest(org_id=new_org_id), timeout=30)

            def audit_waits() -> bool:
                row = holder.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                                     " AND classid = 0 AND objid::bigint = %s AND objsubid = 1", (HOLD,)).fetchone()
                return call.done() or bool(row and row[0])
            wait_for(audit_waits, 30, "the KeySent audit insert to wait for the held lock (or the call to end)")
            answered_early = call.done()
        finally:
            holder.execute("SELECT pg_advisory_unlock(%s)", (HOLD,))
        kp = call.result(timeout=30)
        rows = _keysent_rows(pg, new_org_id)  # at once: no waiting
    assert not answered_early, "GetKeyPair answered while its KeySent audit row was not written yet"
    assert kp.key_id == key_id and rows == [key_id, key_id]


# ------------------------------------------------------------ one active key

def test_schema_has_the_one_active_key_per_org_index(
    ca: CAProcess, platform: Clients, pki_dir: Path, pg: PgCluster, tmp_path: Path, new_org_id: str,
) -> None:
    idx = pg.psql("SELECT indexdef FROM pg_indexes WHERE schemaname = 'public' AND tablename = 'intermediate_keys'"
                  " AND indexname = 'intermediate_keys_one_active'")
    assert idx.startswith("CREATE UNIQUE INDEX") and "(org_id) WHERE (state = 'active'::text)" in idx, \
        f"the one-active-key-per-org index is missing or changed: {idx!r}"
    # It holds: a second active row for an org is refused by the database itself (rolled back).
    _, _, key_id = _org_with_key(ca, platform, pki_dir, tmp_path, new_org_id)
    with psycopg.connect(pg.admin_dsn()) as c:
        with pytest.raises(psycopg.errors.UniqueViolation, match="intermediate_keys_one_active"):
            c.execute("INSERT INTO intermediate_keys (key_id, org_id, state, version, algorithm, keylib_format,"
                      " spki_sha256, sealed_key, certificate_pem) SELECT gen_random_uuid(), org_id, 'active',"
                      " version + 1, algorithm, keylib_format, '\\x00', '\\x00', 'not a certificate'"
                      " FROM intermediate_keys WHERE key_id = %s", (key_id,))
        c.rollback()
    assert pg.psql(f"SELECT count(*) FROM intermediate_keys WHERE org_id = '{new_org_id}'") == "1"


def test_no_commit_of_a_rotation_leaves_two_active_keys(
    ca: CAProcess, platform: Clients, pki_dir: Path, pg: PgCluster, tmp_path: Path, new_org_id: str,
) -> None:
    """The rotation is held where it retires the old key (the test holds a share lock on the old
    key's row); what is committed meanwhile, read from another connection, has one active key:
    the old one. A rotation that activated the new key in a transaction of its own would show two."""
    admin, root, old = _org_with_key(ca, platform, pki_dir, tmp_path, new_org_id)
    csr = admin.admin.RequestIntermediateCsr(pb.RequestIntermediateCsrRequest(org_id=new_org_id), timeout=60)
    upload = pb.UploadIntermediateCertificateRequest(org_id=new_org_id, certificate_pem=root.sign(csr.csr_pem),
                                                     chain_pem=root.crt.read_text())
    active = ("SELECT coalesce(string_agg(key_id::text, ',' ORDER BY key_id), '') FROM intermediate_keys"
              " WHERE org_id = %s AND state = 'active'")
    with psycopg.connect(pg.admin_dsn()) as holder, psycopg.connect(pg.admin_dsn(), autocommit=True) as reader:
        holder.execute("SELECT 1 FROM intermediate_keys WHERE key_id = %s FOR SHARE", (old,))
        holder_pid = holder.info.backend_pid
        call = admin.admin.UploadIntermediateCertificate.future(upload, timeout=60)
        try:
            def rotation_held() -> bool:
                row = reader.execute("SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                                     (holder_pid,)).fetchone()
                return call.done() or bool(row and row[0])
            wait_for(rotation_held, 30, "the rotation to wait for the old key's row (or to end)")
            row = reader.execute(active, (new_org_id,)).fetchone()
            during = row[0] if row else ""
        finally:
            holder.rollback()
        inter = call.result(timeout=60)
        row = reader.execute(active, (new_org_id,)).fetchone()
        after = row[0] if row else ""
    assert during == old, f"while the rotation was under way the committed state had active key(s) {during}"
    assert inter.key_id == csr.key_id and inter.state == pb.INTERMEDIATE_STATE_ACTIVE
    assert after == csr.key_id


# ----------------------------------------------------------- request_id retry

def test_request_csr_retry_with_the_same_request_id_keeps_the_pending_key(
    ca: CAProcess, platform: Clients, pki_dir: Path, tmp_path: Path, new_org_id: str,
) -> None:
    create_org(platform, new_org_id)
    admin = org_admin(ca.addr, pki_dir, new_org_id)
    req = pb.RequestIntermediateCsrRequest(org_id=new_org_id, request_id=f"csr-{new_org_id}")
    first = admin.admin.RequestIntermediateCsr(req, timeout=60)
    again = admin.admin.RequestIntermediateCsr(req, timeout=60)  # the retry of a call whose answer was lost
    assert again.key_id == first.key_id, \
        f"the retry made another pending key ({again.key_id}) instead of answering with {first.key_id}"
    assert (again.csr_pem, again.public_key_sha256, again.algorithm) == \
        (first.csr_pem, first.public_key_sha256, first.algorithm)
    listed = admin.admin.ListIntermediates(pb.ListIntermediatesRequest(org_id=new_org_id), timeout=30)
    assert [(i.key_id, i.state) for i in listed.intermediates] == [(first.key_id, pb.INTERMEDIATE_STATE_PENDING)]
    # The same id with other parameters is another call: refused, not answered with this one's result.
    code, msg = code_of(admin.admin.RequestIntermediateCsr, pb.RequestIntermediateCsrRequest(
        org_id=new_org_id, request_id=f"csr-{new_org_id}", algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=60)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "already used" in msg, (code, msg)
    # The CSR the caller kept is still the one to sign.
    root = OrgRoot.create(tmp_path, new_org_id)
    inter = admin.admin.UploadIntermediateCertificate(pb.UploadIntermediateCertificateRequest(
        org_id=new_org_id, certificate_pem=root.sign(first.csr_pem), chain_pem=root.crt.read_text()), timeout=30)
    assert inter.key_id == first.key_id and inter.state == pb.INTERMEDIATE_STATE_ACTIVE


# ------------------------------------------------------ another org's keys

@pytest.fixture
def victim(ca: CAProcess, platform: Clients, pki_dir: Path, tmp_path: Path, new_org_id: str
           ) -> tuple[str, str, pb.RequestIntermediateCsrResponse]:
    """An org with an active key and a pending one: (org_id, active key_id, pending CSR)."""
    admin, _, key_id = _org_with_key(ca, platform, pki_dir, tmp_path, new_org_id)
    pending = admin.admin.RequestIntermediateCsr(pb.RequestIntermediateCsrRequest(org_id=new_org_id), timeout=60)
    return new_org_id, key_id, pending


def _intruder(ca: CAProcess, platform: Clients, pki_dir: Path, org_id: str) -> Clients:
    """The admin of another, existing org."""
    create_org(platform, f"{org_id}-x")
    return org_admin(ca.addr, pki_dir, f"{org_id}-x")


@pytest.mark.parametrize("which", ["active", "pending"])
def test_org_admin_cannot_revoke_another_orgs_key(
    ca: CAProcess, platform: Clients, pki_dir: Path, pg: PgCluster,
    victim: tuple[str, str, pb.RequestIntermediateCsrResponse], which: str,
) -> None:
    org_id, active, pending = victim
    intruder = _intruder(ca, platform, pki_dir, org_id)
    before = table_snapshot(pg)
    key_id = active if which == "active" else pending.key_id
    code, msg = code_of(intruder.admin.RevokeIntermediate,
                        pb.RevokeIntermediateRequest(org_id=org_id, key_id=key_id, reason="hostile"))
    assert code == PD and "may not act on organization" in msg, (code, msg)
    assert table_snapshot(pg) == before, "a refused revocation changed the database"
    kp = clients(ca.addr, pki_dir, "zen-public").keys.GetKeyPair(pb.GetKeyPairRequest(org_id=org_id), timeout=30)
    assert kp.key_id == active


def test_org_admin_cannot_upload_a_certificate_for_another_org(
    ca: CAProcess, platform: Clients, pki_dir: Path, pg: PgCluster, tmp_path: Path,
    victim: tuple[str, str, pb.RequestIntermediateCsrResponse],
) -> None:
    """The intruder signs the victim's pending CSR under a root of its own: were it accepted,
    the victim's ZENs would mint under the intruder's chain."""
    org_id, active, pending = victim
    intruder = _intruder(ca, platform, pki_dir, org_id)
    rogue = OrgRoot.create(tmp_path / "rogue", f"{org_id}-x")
    before = table_snapshot(pg)
    code, msg = code_of(intruder.admin.UploadIntermediateCertificate, pb.UploadIntermediateCertificateRequest(
        org_id=org_id, certificate_pem=rogue.sign(pending.csr_pem), chain_pem=rogue.crt.read_text()))
    assert code == PD and "may not act on organization" in msg, (code, msg)
    assert table_snapshot(pg) == before, "a refused upload changed the database"
    kp = clients(ca.addr, pki_dir, "zen-public").keys.GetKeyPair(pb.GetKeyPairRequest(org_id=org_id), timeout=30)
    assert kp.key_id == active
