"""data_plane.keys: when an org's key leaves the ZEN (dropped, revoked, rotated out), whatever was
minted with it goes too: the Minter's cached leaves and their leaf key (a review finding:
Minter.forget was never called)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from data_plane.keys import KeyManager, OrgKey
from data_plane.mint import Minter
from data_plane.signer import Signer
from keylib.securemem import from_bytes


def _org_signer() -> tuple[Signer, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "org intermediate")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    buf = from_bytes(key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    try:
        return Signer.start(buf, pem), pem
    finally:
        buf.wipe()


def test_a_dropped_key_takes_its_minted_leaves_with_it() -> None:
    signer, pem = _org_signer()
    minter = Minter()
    km = KeyManager(client=None, master=None)  # type: ignore[arg-type]  # no CA needed to drop a key
    km.on_key_gone.append(minter.forget)
    km.keys["acme"] = OrgKey("acme", "k1", 1, pem, "", signer)
    minter.context_for("acme", "k1", signer, pem, "shop.example", [])
    cache: Any = minter._cache  # the cache is the subject of this test
    assert any(k[0] == "acme" for k in cache) and "acme" in minter._keys
    km.drop("acme", "revoked")
    assert not any(k[0] == "acme" for k in cache) and "acme" not in minter._keys


def test_ca_reachability_is_in_the_health_report() -> None:
    """KeyManager.ca_reachable (issue 12 point 7 named it dead) is what /healthz reports as ca_reachable,
    beside the keyward_zen_ca_reachable gauge: kept."""
    km = KeyManager(client=None, master=None)  # type: ignore[arg-type]
    assert km.health()[1]["ca_reachable"] is False
    km._reachable(True)
    assert km.health()[1]["ca_reachable"] is True
