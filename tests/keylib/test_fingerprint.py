"""keylib.envelope.spki_sha256: the one public-key fingerprint in a sealed key's associated data.

The CA seals a key under the fingerprint of the key it generated; a ZEN opens it under the
fingerprint of the certificate the CA sent. Two definitions that drift apart would not fail
loudly anywhere: every key would simply stop opening. Both sides call this one."""

from __future__ import annotations

import datetime as dt
import hashlib
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keylib.envelope import spki_sha256
from keylib.master import MasterSecret


def test_it_is_sha256_of_the_der_subject_public_key_info() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert spki_sha256(key) == hashlib.sha256(der).digest()


@pytest.mark.parametrize("alg", ["EC_P256", "RSA_2048"])
def test_a_key_sealed_by_the_ca_opens_in_a_zen_from_its_certificate(alg: str) -> None:
    from control_plane.certs import KeyAlgorithm
    from control_plane.custody import new_pending_key
    from data_plane.keyopen import open_org_key

    master = MasterSecret.from_bytes(os.urandom(48))
    pending = new_pending_key(master, org_id="acme", algorithm=KeyAlgorithm[alg], common_name="acme intermediate",
                              organization="Acme")
    csr = x509.load_pem_x509_csr(pending.csr_pem.encode())
    root_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "acme root")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(name).public_key(csr.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(root_key, hashes.SHA256()))
    assert pending.spki_sha256 == spki_sha256(cert.public_key())
    buf = open_org_key(master, org_id="acme", key_id=pending.key_id, keylib_format=pending.keylib_format,
                       sealed=pending.sealed, certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode())
    try:
        key = serialization.load_der_private_key(bytes(buf.view), None)
        assert spki_sha256(key.public_key()) == pending.spki_sha256
    finally:
        buf.wipe()
        master.wipe()


def test_both_sides_call_it() -> None:
    import inspect

    from control_plane import certs
    from data_plane import keyopen

    assert keyopen.spki_sha256 is spki_sha256  # the ZEN's opening side
    assert "envelope.spki_sha256(public_key)" in inspect.getsource(certs.spki_sha256)  # the CA's sealing side
