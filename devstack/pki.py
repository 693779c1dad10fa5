"""Dev PKI for the local stack and the tests (never for production).

Writes PEM files into a folder:

    ca.crt / ca.key          trust anchor for the CA server and all clients
    server.crt / server.key  the Central Authority (localhost, 127.0.0.1)
    platform-admin.{crt,key} spiffe://<td>/platform-admin
    org-admin-<org>.{crt,key} spiffe://<td>/org-admin/<org>
    zen-public.{crt,key}     spiffe://<td>/zen-pool/public
    zen-private.{crt,key}    spiffe://<td>/zen-pool/private

These are TLS identities only. Org intermediate keys never touch this folder.

Also a throwaway org root CA (``org_root``) and the signing of an org's intermediate CSR with it
(``sign_intermediate``), for ``keyward dev org-root`` / ``keyward dev sign``: what an org does with
its real root, which lives offline.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keylib.tlsid import build_cert as build_cert  # re-exported for the demo and tests

TRUST_DOMAIN = "keyward"

PrivKey = ec.EllipticCurvePrivateKey


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: PrivKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load(pki: Path) -> tuple[x509.Certificate, PrivKey]:
    cert = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def write_identity(pki: Path, stem: str, cert: x509.Certificate, key: PrivKey) -> None:
    _write(pki / f"{stem}.crt", cert.public_bytes(serialization.Encoding.PEM))
    _write(pki / f"{stem}.key", _key_pem(key), private=True)


def client(pki: Path, stem: str, spiffe_path: str, *, trust_domain: str = TRUST_DOMAIN) -> None:
    """Issue a client identity ``spiffe://<td>/<spiffe_path>`` as ``stem``."""
    ca, ca_key = _load(pki)
    cert, key = build_cert(subject_cn=stem, issuer=ca, issuer_key=ca_key,
                           uris=[f"spiffe://{trust_domain}/{spiffe_path}"])
    write_identity(pki, stem, cert, key)


def org_admin(pki: Path, org_id: str) -> None:
    client(pki, f"org-admin-{org_id}", f"org-admin/{org_id}")


NOT_FOR_PRODUCTION = "NOT FOR PRODUCTION"


def org_root(d: Path, org_id: str, *, days: int = 3650) -> x509.Certificate:
    """A throwaway root CA for an org, ``d/root.crt`` and ``d/root.key`` (EC P-256, unencrypted),
    labelled NOT FOR PRODUCTION in its subject."""
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    cn = f"{NOT_FOR_PRODUCTION} dev root of {org_id}"[:64]
    cert, key = build_cert(subject_cn=cn, issuer=None, issuer_key=None, is_ca=True,
                           not_after=_now() + dt.timedelta(days=days))
    write_identity(d, "root", cert, key)
    return cert


def load_root(d: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey]:
    """``d/root.crt`` and ``d/root.key`` (raises OSError, ValueError)."""
    cert = x509.load_pem_x509_certificate((d / "root.crt").read_bytes())
    key = serialization.load_pem_private_key((d / "root.key").read_bytes(), None)
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise ValueError(f"{d / 'root.key'} is neither an EC nor an RSA key")
    return cert, key


def sign_intermediate(csr_pem: bytes, root: x509.Certificate, root_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
                      *, days: int = 365) -> x509.Certificate:
    """Sign an org intermediate's CSR as its root would: the CSR's subject and key, CA:TRUE with
    pathlen:0, keyUsage keyCertSign and cRLSign (critical), and the name constraints the CSR asks
    for copied as they are (the CA refuses an upload that differs from the org policy's).
    Raises ValueError for a CSR that does not parse or whose signature does not verify."""
    csr = x509.load_pem_x509_csr(csr_pem)
    if not csr.is_signature_valid:
        raise ValueError("the CSR's signature does not verify")
    now = _now()
    b = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(root.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), root.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
    )
    try:
        nc = csr.extensions.get_extension_for_class(x509.NameConstraints)
        b = b.add_extension(nc.value, critical=nc.critical)
    except x509.ExtensionNotFound:
        pass
    return b.sign(root_key, hashes.SHA256())


def init(pki: Path) -> None:
    """Create the dev PKI if ``pki`` has none."""
    pki.mkdir(parents=True, exist_ok=True)
    os.chmod(pki, 0o700)
    if (pki / "ca.crt").exists():
        return
    ca, ca_key = build_cert(subject_cn="keyward dev platform CA", issuer=None, issuer_key=None,
                            is_ca=True, not_after=_now() + dt.timedelta(days=3650))
    write_identity(pki, "ca", ca, ca_key)
    srv, srv_key = build_cert(subject_cn="keyward-ca", issuer=ca, issuer_key=ca_key, server=True,
                              uris=[f"spiffe://{TRUST_DOMAIN}/ca"], dns=["localhost", "keyward-ca"],
                              ips=["127.0.0.1"])
    write_identity(pki, "server", srv, srv_key)
    client(pki, "platform-admin", "platform-admin")
    client(pki, "zen-public", "zen-pool/public")
    client(pki, "zen-private", "zen-pool/private")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m devstack.pki", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_init = sub.add_parser("init", help="create the dev PKI in DIR")
    p_init.add_argument("dir", type=Path)
    p_org = sub.add_parser("org-admin", help="issue org-admin-ORG.{crt,key} in DIR")
    p_org.add_argument("dir", type=Path)
    p_org.add_argument("org")
    a = ap.parse_args()
    if a.cmd == "init":
        init(a.dir)
    else:
        org_admin(a.dir, a.org)


if __name__ == "__main__":
    main()
