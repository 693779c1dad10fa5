"""X.509 rules of the CA (pure): key generation, CSRs, intermediate checks.

Upload rule: an org's signed intermediate is accepted only if

1. it parses as exactly one PEM certificate (size-limited),
2. its public key is the pending key's,
3. it is a CA certificate (BasicConstraints ca=TRUE) with keyUsage
   keyCertSign, and pathLenConstraint is 0 (no sub-CAs: a ZEN mints leaves
   only; an absent or larger path length is refused),
4. it is valid now,
5. a chain is given up to the org's self-signed root, and it verifies link by
   link (each issuer a CA whose key signed the certificate below it, each
   valid now; the root's own signature too). Without it a certificate that
   merely carries the pending public key, under a bogus signature, would
   rotate the good key out and break interception.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import Enum

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from control_plane.errors import InvalidArgument
from keylib import envelope
from keylib.names import NameConstraints

MAX_PEM_BYTES = 64 * 1024
MAX_CHAIN = 8
MAX_NAME = 64

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class KeyAlgorithm(Enum):
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"
    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"


def generate_key(alg: KeyAlgorithm) -> PrivateKey:
    if alg is KeyAlgorithm.EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if alg is KeyAlgorithm.EC_P384:
        return ec.generate_private_key(ec.SECP384R1())
    bits = {KeyAlgorithm.RSA_2048: 2048, KeyAlgorithm.RSA_3072: 3072, KeyAlgorithm.RSA_4096: 4096}[alg]
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def spki_sha256(public_key: object) -> bytes:
    """The fingerprint a sealed key is bound to (:func:`keylib.envelope.spki_sha256`), of an RSA
    or EC key: the only kinds the CA generates or accepts."""
    if not isinstance(public_key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        raise InvalidArgument("certificate key type is not RSA or EC")
    return envelope.spki_sha256(public_key)


def build_csr(key: PrivateKey, *, common_name: str, organization: str,
              constraints: NameConstraints | None = None) -> bytes:
    """A PKCS#10 CSR asking for an intermediate CA with pathLen 0 and, when the org's policy
    sets them, its name constraints (critical, as RFC 5280 requires)."""
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(attrs))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                          crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True,
        )
    )
    if constraints is not None:
        builder = builder.add_extension(constraints.extension(), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def check_subject_field(value: str, what: str) -> str:
    v = value.strip()
    if len(v) > MAX_NAME or any(ord(c) < 0x20 for c in v):
        raise InvalidArgument(f"{what} must be at most {MAX_NAME} printable characters")
    return v


def parse_pem_certs(pem: str, what: str, *, max_count: int) -> list[x509.Certificate]:
    raw = pem.encode()
    if len(raw) > MAX_PEM_BYTES:
        raise InvalidArgument(f"{what} is {len(raw)} bytes; at most {MAX_PEM_BYTES} are accepted")
    if not raw.strip():
        return []
    if b"PRIVATE KEY" in raw:
        raise InvalidArgument(f"{what} contains a private key; send certificates only")
    try:
        certs = x509.load_pem_x509_certificates(raw)
    except ValueError:
        raise InvalidArgument(f"{what} is not valid PEM: expected '-----BEGIN CERTIFICATE-----' blocks") from None
    if len(certs) > max_count:
        raise InvalidArgument(f"{what} holds {len(certs)} certificates; at most {max_count}")
    return certs


@dataclass(frozen=True)
class CertInfo:
    subject: str
    serial_hex: str
    not_before: dt.datetime
    not_after: dt.datetime
    spki_sha256: bytes


def info(cert: x509.Certificate) -> CertInfo:
    return CertInfo(
        subject=cert.subject.rfc4514_string(),
        serial_hex=format(cert.serial_number, "x"),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        spki_sha256=spki_sha256(cert.public_key()),
    )


def _valid_now(cert: x509.Certificate, what: str, now: dt.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise InvalidArgument(f"{what} is not valid until {cert.not_valid_before_utc.isoformat()}")
    if now > cert.not_valid_after_utc:
        raise InvalidArgument(f"{what} expired on {cert.not_valid_after_utc.isoformat()}")


def _is_ca(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None
    return bc if bc.ca else None


def validate_intermediate(
    certificate_pem: str,
    chain_pem: str,
    *,
    pending_spki_sha256: bytes,
    constraints: NameConstraints | None = None,
    now: dt.datetime | None = None,
) -> tuple[CertInfo, str, str]:
    """Check an uploaded intermediate; return its info and normalized PEMs. Its name
    constraints must be exactly ``constraints`` (the org policy's; None: none at all)."""
    now = now or dt.datetime.now(dt.UTC)
    certs = parse_pem_certs(certificate_pem, "certificate_pem", max_count=1)
    if len(certs) != 1:
        raise InvalidArgument("certificate_pem must hold exactly one certificate")
    cert = certs[0]
    chain = parse_pem_certs(chain_pem, "chain_pem", max_count=MAX_CHAIN)
    ci = info(cert)
    if ci.spki_sha256 != pending_spki_sha256:
        raise InvalidArgument(
            "certificate's public key does not match the pending key (sha256 "
            f"{pending_spki_sha256.hex()[:16]}...): sign the CSR that RequestIntermediateCsr returned"
        )
    bc = _is_ca(cert)
    if bc is None:
        raise InvalidArgument("certificate is not a CA certificate (BasicConstraints CA:TRUE is required)")
    if bc.path_length is None or bc.path_length > 0:
        raise InvalidArgument(
            "certificate allows sub-CAs (pathLenConstraint is "
            f"{'absent' if bc.path_length is None else bc.path_length}); sign it with pathlen:0"
        )
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign:
            raise InvalidArgument("certificate's keyUsage lacks keyCertSign")
    except x509.ExtensionNotFound:
        raise InvalidArgument("certificate has no keyUsage extension; keyCertSign is required") from None
    _check_constraints(cert, constraints)
    _valid_now(cert, "certificate", now)
    if not chain:
        raise InvalidArgument("chain_pem is required: give the certificates from the intermediate's issuer up to "
                              "your org's self-signed root, nearest issuer first")
    below = cert
    for i, issuer in enumerate(chain):
        what = f"chain certificate {i + 1}"
        ibc = _is_ca(issuer)
        if ibc is None:
            raise InvalidArgument(f"{what} ({issuer.subject.rfc4514_string()}) is not a CA certificate")
        # The issuer must be allowed to sign CAs this deep: i+1 CA certificates
        # (the intermediate and the chain certificates below this one) sit under it.
        if ibc.path_length is not None and ibc.path_length < i + 1:
            raise InvalidArgument(
                f"{what} ({issuer.subject.rfc4514_string()}) has pathLenConstraint {ibc.path_length}: "
                "it may not issue the CA certificate(s) below it")
        try:
            iku = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
            if not iku.key_cert_sign:
                raise InvalidArgument(f"{what} ({issuer.subject.rfc4514_string()}) lacks keyUsage keyCertSign")
        except x509.ExtensionNotFound:
            pass  # RFC 5280 leaves keyUsage optional on a CA certificate
        _valid_now(issuer, what, now)
        try:
            below.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            raise InvalidArgument(
                f"chain does not verify: {below.subject.rfc4514_string()} is not signed by {what} "
                f"({issuer.subject.rfc4514_string()}); give the chain nearest issuer first"
            ) from None
        below = issuer
    if below.issuer != below.subject:
        raise InvalidArgument(
            f"chain_pem ends at {below.subject.rfc4514_string()}, issued by {below.issuer.rfc4514_string()}: "
            "it must end with your org's self-signed root")
    try:
        below.verify_directly_issued_by(below)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        raise InvalidArgument("chain's self-signed root does not verify") from None
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    chain_out = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in chain)
    return ci, pem, chain_out


def _check_constraints(cert: x509.Certificate, want: NameConstraints | None) -> None:
    try:
        got = NameConstraints.of_certificate(cert)
    except ValueError as e:
        raise InvalidArgument(f"certificate's name constraints: {e}") from None
    if got == want:
        return
    def show_nc(nc: NameConstraints | None) -> str:
        return "none" if nc is None else f"permitted {list(nc.permitted)}, excluded {list(nc.excluded)}"
    raise InvalidArgument(
        f"certificate's name constraints ({show_nc(got)}) differ from the org policy's ({show_nc(want)}): "
        "sign the CSR keeping its NameConstraints extension as requested (e.g. openssl x509 -req "
        "-copy_extensions copyall), or change the policy and request a new CSR")
