"""control_plane.certs: the upload rules for an org's signed intermediate."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from control_plane.certs import KeyAlgorithm, build_csr, generate_key, spki_sha256, validate_intermediate
from control_plane.errors import InvalidArgument

NOW = dt.datetime.now(dt.UTC)


def _root(name: str = "root") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    k = ec.generate_private_key(ec.SECP256R1())
    n = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)])
    c = (x509.CertificateBuilder().subject_name(n).issuer_name(n).public_key(k.public_key())
         .serial_number(1).not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=99))
         .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(k, hashes.SHA256()))
    return c, k


def _issue(pub: object, root: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], *, ca: bool = True,
           path_length: int | None = 0, cert_sign: bool = True, key_usage: bool = True,
           nb: dt.datetime | None = None, na: dt.datetime | None = None) -> str:
    rc, rk = root
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "i")]))
         .issuer_name(rc.subject).public_key(pub).serial_number(7)  # type: ignore[arg-type]
         .not_valid_before(nb or NOW - dt.timedelta(hours=1)).not_valid_after(na or NOW + dt.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True))
    if key_usage:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, cert_sign, cert_sign, False, False),
                            critical=True)
    return b.sign(rk, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture(scope="module")
def key() -> object:
    return generate_key(KeyAlgorithm.EC_P256)


def test_accepts_a_proper_intermediate(key: object) -> None:
    root = _root()
    fp = spki_sha256(key.public_key())  # type: ignore[attr-defined]
    info, pem, chain = validate_intermediate(_issue(key.public_key(), root), root[0].public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM).decode(), pending_spki_sha256=fp)
    assert info.serial_hex == "7" and info.spki_sha256 == fp and chain.startswith("-----BEGIN CERTIFICATE")


@pytest.mark.parametrize("kw,msg", [
    ({"ca": False}, "not a CA"),
    ({"path_length": None}, "absent"),
    ({"path_length": 2}, "sub-CAs"),
    ({"cert_sign": False}, "keyCertSign"),
    ({"na": NOW - dt.timedelta(days=1), "nb": NOW - dt.timedelta(days=5)}, "expired"),
    ({"nb": NOW + dt.timedelta(days=1)}, "not valid until"),
])
def test_refusals(key: object, kw: dict[str, object], msg: str) -> None:
    root = _root()
    with pytest.raises(InvalidArgument, match=msg):
        validate_intermediate(_issue(key.public_key(), root, **kw), "",  # type: ignore[attr-defined, arg-type]
                              pending_spki_sha256=spki_sha256(key.public_key()))  # type: ignore[attr-defined]


def test_an_intermediate_without_key_usage_is_refused_even_with_a_good_chain(key: object) -> None:
    """No keyUsage extension at all is not "keyUsage unrestricted": the intermediate must say
    keyCertSign. Everything else about it is right (the chain verifies), so only that rule refuses it."""
    root = _root()
    fp = spki_sha256(key.public_key())  # type: ignore[attr-defined]
    chain = root[0].public_bytes(serialization.Encoding.PEM).decode()
    bare = _issue(key.public_key(), root, key_usage=False)  # type: ignore[attr-defined]
    with pytest.raises(x509.ExtensionNotFound):
        x509.load_pem_x509_certificate(bare.encode()).extensions.get_extension_for_class(x509.KeyUsage)
    with pytest.raises(InvalidArgument, match="no keyUsage extension; keyCertSign is required"):
        validate_intermediate(bare, chain, pending_spki_sha256=fp)
    # The same certificate with keyUsage keyCertSign passes: the refusal is the missing extension's.
    good = _issue(key.public_key(), root)  # type: ignore[attr-defined]
    assert validate_intermediate(good, chain, pending_spki_sha256=fp)[0].spki_sha256 == fp


def test_wrong_key_and_wrong_chain(key: object) -> None:
    root = _root()
    other = generate_key(KeyAlgorithm.EC_P256)
    with pytest.raises(InvalidArgument, match="does not match the pending key"):
        validate_intermediate(_issue(other.public_key(), root), "", pending_spki_sha256=spki_sha256(key.public_key()))  # type: ignore[attr-defined]
    stranger = _root("stranger")[0].public_bytes(serialization.Encoding.PEM).decode()
    with pytest.raises(InvalidArgument, match="chain does not verify"):
        validate_intermediate(_issue(key.public_key(), root), stranger,  # type: ignore[attr-defined]
                              pending_spki_sha256=spki_sha256(key.public_key()))  # type: ignore[attr-defined]


def test_csr_asks_for_pathlen_zero_ca() -> None:
    k = generate_key(KeyAlgorithm.EC_P384)
    csr = x509.load_pem_x509_csr(build_csr(k, common_name="acme intermediate", organization="Acme"))
    bc = csr.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0 and csr.is_signature_valid


def test_issuer_constraints_are_enforced(key: object) -> None:
    """An issuer with pathlen:0 may not sign another CA; one without keyCertSign may not sign at all."""
    rc, rk = _root()
    mid_key = ec.generate_private_key(ec.SECP256R1())
    for path_length, cert_sign, msg in ((0, True, "pathLenConstraint 0"), (None, False, "keyCertSign")):
        mid = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "mid")]))
               .issuer_name(rc.subject).public_key(mid_key.public_key()).serial_number(9)
               .not_valid_before(NOW - dt.timedelta(hours=1)).not_valid_after(NOW + dt.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
               .add_extension(x509.KeyUsage(True, False, False, False, False, cert_sign, True, False, False),
                              critical=True)
               .sign(rk, hashes.SHA256()))
        leaf = _issue(key.public_key(), (mid, mid_key))  # type: ignore[attr-defined]
        chain = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in (mid, rc))
        with pytest.raises(InvalidArgument, match=msg):
            validate_intermediate(leaf, chain, pending_spki_sha256=spki_sha256(key.public_key()))  # type: ignore[attr-defined]


def test_a_bogus_signature_is_refused_with_or_without_a_chain(key: object) -> None:
    """The adversarial upload: the pending public key, the org root's name as issuer, but signed by
    an attacker's key. Without a chain it used to be accepted (and rotated the good key out)."""
    root = _root()
    attacker = _root("root")  # same name, other key
    bogus = _issue(key.public_key(), (root[0], attacker[1]))  # type: ignore[attr-defined]
    fp = spki_sha256(key.public_key())  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgument, match="chain_pem is required"):
        validate_intermediate(bogus, "", pending_spki_sha256=fp)
    with pytest.raises(InvalidArgument, match="chain does not verify"):
        validate_intermediate(bogus, root[0].public_bytes(serialization.Encoding.PEM).decode(), pending_spki_sha256=fp)


def test_the_chain_must_end_at_a_self_signed_root(key: object) -> None:
    rc, rk = _root()
    mid_key = ec.generate_private_key(ec.SECP256R1())
    mid = (x509.CertificateBuilder()
           .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "mid")]))
           .issuer_name(rc.subject).public_key(mid_key.public_key()).serial_number(9)
           .not_valid_before(NOW - dt.timedelta(hours=1)).not_valid_after(NOW + dt.timedelta(days=30))
           .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
           .sign(rk, hashes.SHA256()))
    leaf = _issue(key.public_key(), (mid, mid_key))  # type: ignore[attr-defined]
    fp = spki_sha256(key.public_key())  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgument, match="must end with your org's self-signed root"):
        validate_intermediate(leaf, mid.public_bytes(serialization.Encoding.PEM).decode(), pending_spki_sha256=fp)
    full = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in (mid, rc))
    assert validate_intermediate(leaf, full, pending_spki_sha256=fp)[2] == full
