"""The whole admin flow against a real CA, Postgres and openssl:
create org, request CSR, sign it with openssl as the org's root CA would,
upload, fetch as a ZEN, and open the ciphertext with the data plane's key
library to check it is the key of the certificate. Then rotate and revoke."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from data_plane.keyopen import open_org_key
from devstack.pg import PgCluster
from keylib.master import MasterSecret
from protos.keyward.v1 import keyward_pb2 as pb
from tests.helpers import CAProcess, Clients, OrgRoot, clients, code_of, wait_for
from tests.integration.flow import activate, create_org, org_admin


def _open(kp: pb.KeyPair, secret: bytes) -> bytes:
    """Open as a ZEN does: the data plane's key library, with the public-key
    binding taken from the certificate, not from the wire."""
    master = MasterSecret.from_bytes(secret)
    try:
        buf = open_org_key(master, org_id=kp.org_id, key_id=kp.key_id, keylib_format=kp.keylib_format,
                           sealed=kp.encrypted_private_key, certificate_pem=kp.certificate_pem)
        try:
            return bytes(buf.view)
        finally:
            buf.wipe()
    finally:
        master.wipe()


@pytest.mark.parametrize("algorithm,expect", [
    (pb.KEY_ALGORITHM_UNSPECIFIED, ("RSA", 2048)),
    (pb.KEY_ALGORITHM_RSA_3072, ("RSA", 3072)),
    (pb.KEY_ALGORITHM_EC_P256, ("EC", 256)),
    (pb.KEY_ALGORITHM_EC_P384, ("EC", 384)),
])
def test_flow_zen_opens_the_key_of_the_certificate(
    ca: CAProcess, platform: Clients, pki_dir: Path, master_secret: tuple[bytes, Path], tmp_path: Path,
    new_org_id: str, algorithm: int, expect: tuple[str, int],
) -> None:
    create_org(platform, new_org_id)
    admin = org_admin(ca.addr, pki_dir, new_org_id)
    root = OrgRoot.create(tmp_path, new_org_id)
    csr_resp, inter, cert_pem = activate(admin, root, new_org_id, algorithm)

    csr = x509.load_pem_x509_csr(csr_resp.csr_pem.encode())
    assert csr.is_signature_valid
    assert csr.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    assert inter.state == pb.INTERMEDIATE_STATE_ACTIVE and inter.version == 1

    zen = clients(ca.addr, pki_dir, "zen-public")
    kp = zen.keys.GetKeyPair(pb.GetKeyPairRequest(org_id=new_org_id), timeout=30)
    assert kp.key_id == csr_resp.key_id and kp.version == 1 and kp.keylib_format == "keyward-keylib/1"
    assert kp.certificate_pem.strip() == cert_pem.strip()
    assert kp.chain_pem.strip() == root.crt.read_text().strip()
    der = _open(kp, master_secret[0])
    key = serialization.load_der_private_key(der, None)
    cert = x509.load_pem_x509_certificate(kp.certificate_pem.encode())
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)
    kind, bits = expect
    assert key.key_size == bits if kind == "RSA" else key.curve.key_size == bits  # type: ignore[union-attr]
    # The ciphertext is not the key, and the key is not anywhere in the response.
    assert der not in kp.SerializeToString()


def test_rotation_deletes_old_key_and_notifies_watchers(
    ca: CAProcess, platform: Clients, pki_dir: Path, pg: PgCluster, tmp_path: Path, new_org_id: str,
) -> None:
    create_org(platform, new_org_id)
    admin = org_admin(ca.addr, pki_dir, new_org_id)
    root = OrgRoot.create(tmp_path, new_org_id)
    first, _, first_cert = activate(admin, root, new_org_id)

    zen = clients(ca.addr, pki_dir, "zen-public")
    stream = zen.keys.WatchKeys(pb.WatchKeysRequest(org_ids=[new_org_id]), timeout=60)
    stream.initial_metadata()  # the stream is established before we rotate
    events: list[pb.KeyEvent] = []
    done = threading.Event()

    def reader() -> None:
        try:
            for ev in stream:
                events.append(ev)
                if len(events) >= 2:
                    break
        except grpc.RpcError:
            pass
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    second, inter2, _ = activate(admin, root, new_org_id)
    assert inter2.version == 2
    wait_for(lambda: len(events) >= 1, 10, "the ROTATED event")
    assert events[0].kind == pb.KEY_EVENT_KIND_ROTATED and events[0].key_id == second.key_id
    assert events[0].version == 2 and events[0].org_id == new_org_id

    # Old key and certificate are gone from the database: a hard delete.
    assert pg.psql(f"SELECT count(*) FROM intermediate_keys WHERE key_id = '{first.key_id}'") == "0"
    assert pg.psql(f"SELECT count(*) FROM intermediate_keys WHERE org_id = '{new_org_id}'") == "1"
    # Nowhere in the database (any table) is the retired certificate left.
    tables = pg.psql("SELECT tablename FROM pg_tables WHERE schemaname='public'").split()
    for t in tables:
        assert first_cert.splitlines()[1] not in pg.psql(f"COPY (SELECT * FROM {t}) TO STDOUT"), t
    listed = admin.admin.ListIntermediates(pb.ListIntermediatesRequest(org_id=new_org_id), timeout=30)
    states = {i.key_id: i.state for i in listed.intermediates}
    assert states == {first.key_id: pb.INTERMEDIATE_STATE_ROTATED, second.key_id: pb.INTERMEDIATE_STATE_ACTIVE}

    kp = zen.keys.GetKeyPair(pb.GetKeyPairRequest(org_id=new_org_id), timeout=30)
    assert kp.key_id == second.key_id and kp.version == 2

    # Revocation works at any time, and ZENs hear it.
    admin.admin.RevokeIntermediate(pb.RevokeIntermediateRequest(org_id=new_org_id, key_id=second.key_id,
                                                                reason="compromise drill"), timeout=30)
    wait_for(lambda: len(events) >= 2, 10, "the REVOKED event")
    assert events[1].kind == pb.KEY_EVENT_KIND_REVOKED and events[1].key_id == second.key_id
    stream.cancel()
    assert pg.psql(f"SELECT count(*) FROM intermediate_keys WHERE org_id = '{new_org_id}'") == "0"
    code, msg = code_of(zen.keys.GetKeyPair, pb.GetKeyPairRequest(org_id=new_org_id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "no active intermediate" in msg
    code, msg = code_of(admin.admin.RevokeIntermediate,
                        pb.RevokeIntermediateRequest(org_id=new_org_id, key_id=second.key_id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "already revoked" in msg


def test_watch_resumes_after_seq_and_policy_events(
    ca: CAProcess, platform: Clients, pki_dir: Path, tmp_path: Path, new_org_id: str,
) -> None:
    create_org(platform, new_org_id)
    admin = org_admin(ca.addr, pki_dir, new_org_id)
    admin.admin.UpdatePolicy(pb.UpdatePolicyRequest(org_id=new_org_id, policy=pb.Policy(
        blocked_hosts=["gambling.example"], fail_mode=pb.FAIL_MODE_CLOSED)), timeout=30)
    zen = clients(ca.addr, pki_dir, "zen-public")
    stream = zen.keys.WatchKeys(pb.WatchKeysRequest(org_ids=[new_org_id], after_seq=1), timeout=30)
    ev = next(iter(stream))
    stream.cancel()
    assert ev.kind == pb.KEY_EVENT_KIND_POLICY_CHANGED and ev.org_id == new_org_id
    assert list(ev.policy.blocked_hosts) == ["gambling.example"] and ev.policy.fail_mode == pb.FAIL_MODE_CLOSED
    assert ev.policy_version == 2


def test_get_key_pair_never_goes_back_in_version(
    ca: CAProcess, platform: Clients, pki_dir: Path, tmp_path: Path, new_org_id: str,
) -> None:
    """A ZEN that has seen version N is never handed an older key (from a
    lagging standby or otherwise): the CA checks the primary, then refuses."""
    create_org(platform, new_org_id)
    activate(org_admin(ca.addr, pki_dir, new_org_id), OrgRoot.create(tmp_path, new_org_id), new_org_id)
    zen = clients(ca.addr, pki_dir, "zen-public")
    assert zen.keys.GetKeyPair(pb.GetKeyPairRequest(org_id=new_org_id, min_version=1), timeout=30).version == 1
    code, msg = code_of(zen.keys.GetKeyPair, pb.GetKeyPairRequest(org_id=new_org_id, min_version=2))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "newest is 1" in msg
