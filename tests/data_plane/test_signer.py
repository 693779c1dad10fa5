"""data_plane.signer: the org key lives only in a child process, which signs
leaves on request and takes the key with it when it ends."""

from __future__ import annotations

import datetime as dt
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from data_plane.signer import LeafRequest, Signer, SignerError
from devstack.pki import build_cert
from keylib.securemem import from_bytes


def _scan_process(pid: int, needles: list[bytes]) -> list[int]:
    """Which needles occur in the readable memory of process ``pid``."""
    found: set[int] = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            addr, perms = line.split()[:2]
            if "r" not in perms or "[vvar]" in line or "[vsyscall]" in line:
                continue
            lo, hi = (int(x, 16) for x in addr.split("-"))
            try:
                mem.seek(lo)
                chunk = mem.read(hi - lo)
            except (OSError, ValueError, OverflowError):
                continue
            for i, n in enumerate(needles):
                if n in chunk:
                    found.add(i)
    return sorted(found)


def _rsa_org() -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca, _ = build_cert(subject_cn="org intermediate", issuer=None, issuer_key=None, is_ca=True)
    return ca, key


def test_signs_leaves_and_the_key_lives_only_in_the_child() -> None:
    ca, key = _rsa_org()
    # An issuer certificate for this RSA key (self-signed is enough for the signer).
    from cryptography.hazmat.primitives import hashes
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "org intermediate")])
    now = dt.datetime.now(dt.UTC)
    issuer = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
              .serial_number(1).not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(key, hashes.SHA256()))
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    nums = key.private_numbers()
    # Private parts only (the modulus is public: it is in every certificate). OpenSSL keeps
    # BIGNUMs as little-endian limbs, so the primes are searched in that byte order.
    needles = [der[320:368], der[-64:-16], nums.p.to_bytes(128, "little")[:48], nums.q.to_bytes(128, "little")[:48]]
    buf = from_bytes(der)
    signer = Signer.start(buf, issuer.public_bytes(serialization.Encoding.PEM).decode())
    buf.wipe()
    try:
        leaf = ec.generate_private_key(ec.SECP256R1())
        spki = leaf.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
        cert = x509.load_der_x509_certificate(signer.sign(LeafRequest(
            "shop.example", ("shop.example", "www.shop.example"), ("127.0.0.1",), spki, now,
            now + dt.timedelta(hours=1), 77)))
        cert.verify_directly_issued_by(issuer)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.DNSName) == ["shop.example", "www.shop.example"]
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        # The child holds the key (its prime factors are in its memory) ...
        assert set(_scan_process(signer.pid, needles)) >= {2, 3}, "the signer holds the key (its primes) while in use"
        # ... and refuses nonsense without dying.
        with pytest.raises(SignerError, match="cannot sign"):
            signer.sign(LeafRequest("x", ("x",), (), b"not a key", now, now, 1))
        assert signer.sign(LeafRequest("y.example", ("y.example",), (), spki, now, now + dt.timedelta(hours=1), 78))
        with open(f"/proc/{signer.pid}/status") as f:
            status = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        assert int(status["VmLck"].split()[0]) > 0, "the signer's memory is locked (mlockall)"
        with open(f"/proc/{signer.pid}/limits") as f:
            assert any(line.startswith("Max core file size") and line.split()[4:6] == ["0", "0"]
                       for line in f), "core dumps are off in the signer"
    finally:
        pid = signer.pid
        signer.stop()
    assert not os.path.exists(f"/proc/{pid}"), "the signer process must be gone with the key"


def test_garbage_key_is_refused() -> None:
    ca, _ = build_cert(subject_cn="i", issuer=None, issuer_key=None, is_ca=True)
    with pytest.raises(SignerError, match="refused the key"):
        Signer.start(from_bytes(b"\x30\x03\x02\x01\x00"), ca.public_bytes(serialization.Encoding.PEM).decode())
