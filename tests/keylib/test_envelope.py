"""keylib seal/open: AES-256-GCM under an HKDF-derived password, bound by AAD
to org, key id and public key."""

from __future__ import annotations

import hashlib
import os

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

import keylib
from keylib.envelope import MAGIC, aad, decode
from keylib.errors import EnvelopeError, MasterSecretError
from keylib.kdf import derive_password, lp
from keylib.master import MasterSecret
from keylib.unwrap import open_sealed
from keylib.wrap import seal

FP = hashlib.sha256(b"spki").digest()
PLAIN = os.urandom(1200)


@pytest.fixture
def master() -> MasterSecret:
    return MasterSecret.from_bytes(os.urandom(48))


def _seal(master: MasterSecret, org: str = "acme", key: str = "k1", fp: bytes = FP) -> bytes:
    return seal(master, org_id=org, key_id=key, spki_sha256=fp, plaintext=PLAIN)


def test_round_trip(master: MasterSecret) -> None:
    sealed = _seal(master)
    assert sealed.startswith(MAGIC) and PLAIN not in sealed
    with open_sealed(master, sealed, org_id="acme", key_id="k1", spki_sha256=FP) as out:
        assert bytes(out.view) == PLAIN


def test_each_seal_has_fresh_salt_and_nonce(master: MasterSecret) -> None:
    a, b = decode(_seal(master)), decode(_seal(master))
    assert a.salt != b.salt and a.nonce != b.nonce and a.ciphertext != b.ciphertext


@pytest.mark.parametrize("org,key,fp", [
    ("globex", "k1", FP),                      # copied to another org
    ("acme", "k2", FP),                        # copied to another row
    ("acme", "k1", hashlib.sha256(b"other").digest()),  # another public key
    ("acm", "ek1", FP),                        # length-prefixing: no ambiguity
])
def test_binding_refuses_other_org_key_or_public_key(master: MasterSecret, org: str, key: str, fp: bytes) -> None:
    with pytest.raises(EnvelopeError) as e:
        open_sealed(master, _seal(master), org_id=org, key_id=key, spki_sha256=fp)
    assert "does not open" in str(e.value)


def test_wrong_master_secret_and_tampering(master: MasterSecret) -> None:
    sealed = _seal(master)
    with pytest.raises(EnvelopeError):
        open_sealed(MasterSecret.from_bytes(os.urandom(48)), sealed, org_id="acme", key_id="k1", spki_sha256=FP)
    for i in (5, 40, len(sealed) - 1):
        bad = bytearray(sealed)
        bad[i] ^= 1
        with pytest.raises(EnvelopeError):
            open_sealed(master, bytes(bad), org_id="acme", key_id="k1", spki_sha256=FP)


def test_malformed_envelopes(master: MasterSecret) -> None:
    with pytest.raises(EnvelopeError, match="unknown format"):
        open_sealed(master, b"XXXX" + _seal(master)[4:], org_id="acme", key_id="k1", spki_sha256=FP)
    with pytest.raises(EnvelopeError, match="truncated"):
        open_sealed(master, MAGIC + b"\0" * 10, org_id="acme", key_id="k1", spki_sha256=FP)
    with pytest.raises(EnvelopeError, match="larger"):
        decode(MAGIC + b"\0" * 20000)


def test_kdf_is_the_documented_hkdf() -> None:
    """Known answer: the derivation equals plain HKDF-SHA256 with the documented inputs,
    so a ZEN built from the docs opens what the CA sealed."""
    secret, salt = bytes(range(48)), bytes(range(32))
    m = MasterSecret.from_bytes(secret)
    with derive_password(m, salt, "acme", "k1") as pw:
        expected = HKDF(hashes.SHA256(), 32, salt, b"keyward-keylib/1 wrap\x00" + lp("acme") + lp("k1")).derive(secret)
        assert bytes(pw.view) == expected
    sealed = seal(m, org_id="acme", key_id="k1", spki_sha256=FP, plaintext=b"x" * 10)
    env = decode(sealed)
    key = HKDF(hashes.SHA256(), 32, env.salt, b"keyward-keylib/1 wrap\x00" + lp("acme") + lp("k1")).derive(secret)
    assert AESGCM(key).decrypt(env.nonce, env.ciphertext, aad("acme", "k1", FP)) == b"x" * 10
    assert keylib.FORMAT == "keyward-keylib/1"


def test_aad_is_the_documented_layout() -> None:
    """Known answer, built from docs/key-custody.md ("The envelope") and not from keylib: a ZEN
    written from the docs must open what the CA sealed, and what it seals must open here. The
    AAD is "keyward-keylib/1 aad" 0x00 || lp(org_id) || lp(key_id) || SHA-256(SPKI), lp being a
    2-byte big-endian length of the UTF-8 bytes (not characters) then those bytes."""
    secret, org, key_id = bytes(range(48)), "acmé-1", "6f1c2f4e-9d1b-4c55-8a47-0f3b5b2a9e10"
    fp = hashlib.sha256(b"the org's SubjectPublicKeyInfo").digest()
    doc_aad = (b"keyward-keylib/1 aad\x00" + b"\x00\x07acm\xc3\xa9-1"
               + b"\x00\x24" + key_id.encode() + fp)
    doc_info = b"keyward-keylib/1 wrap\x00" + b"\x00\x07acm\xc3\xa9-1" + b"\x00\x24" + key_id.encode()
    m = MasterSecret.from_bytes(secret)
    # Sealed by keylib, opened by hand with exactly the documented AAD (and nothing else opens it).
    sealed = seal(m, org_id=org, key_id=key_id, spki_sha256=fp, plaintext=PLAIN)
    assert sealed[:4] == b"KWK1" and len(sealed) == 4 + 32 + 12 + len(PLAIN) + 16
    salt, nonce, body = sealed[4:36], sealed[36:48], sealed[48:]
    gcm = AESGCM(HKDF(hashes.SHA256(), 32, salt, doc_info).derive(secret))
    assert gcm.decrypt(nonce, body, doc_aad) == PLAIN
    swapped = b"keyward-keylib/1 aad\x00" + b"\x00\x24" + key_id.encode() + b"\x00\x07acm\xc3\xa9-1" + fp
    with pytest.raises(InvalidTag):
        gcm.decrypt(nonce, body, swapped)
    # Sealed by hand with the documented AAD, opened by keylib.
    salt, nonce = os.urandom(32), os.urandom(12)
    mine = AESGCM(HKDF(hashes.SHA256(), 32, salt, doc_info).derive(secret)).encrypt(nonce, b"by hand", doc_aad)
    with open_sealed(m, b"KWK1" + salt + nonce + mine, org_id=org, key_id=key_id, spki_sha256=fp) as out:
        assert bytes(out.view) == b"by hand"


def test_master_secret_rules(tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MasterSecretError, match="shorter than 32"):
        MasterSecret.from_bytes(b"short")
    f = os.path.join(str(tmp_path), "m")
    with open(f, "wb") as out:
        out.write(b"s" * 40 + b"\n")
    m = MasterSecret.load(path=f)
    assert bytes(m.view) == b"s" * 40 and "s" * 10 not in repr(m)
    monkeypatch.setenv("KEYWARD_MASTER_SECRET", "e" * 40)
    m2 = MasterSecret.load(path=None)
    assert bytes(m2.view) == b"e" * 40 and "KEYWARD_MASTER_SECRET" not in os.environ
    with pytest.raises(MasterSecretError, match="no master secret"):
        MasterSecret.load(path=None)
    with pytest.raises(MasterSecretError, match="cannot read"):
        MasterSecret.load(path="/nonexistent/master")
