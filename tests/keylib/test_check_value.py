"""The master secret's check value (keylib.kdf.master_check_value): fixed, documented derivation,
different for different secrets, and unrelated to any wrapping key derived from the same secret."""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keylib.kdf import derive_password, master_check_value
from keylib.master import MasterSecret


def _master(b: bytes) -> MasterSecret:
    return MasterSecret.from_bytes(b, require_lock=False)


def test_check_value_is_the_documented_derivation() -> None:
    secret = bytes(range(48))
    key = HKDF(hashes.SHA256(), 32, None, b"keyward master check v1").derive(secret)
    want = hmac.new(key, b"keyward master check value", hashlib.sha256).digest()[:8].hex()
    assert master_check_value(_master(secret)) == want
    assert len(want) == 16


def test_different_secrets_differ_and_the_value_is_no_wrapping_key() -> None:
    a, b = _master(b"a" * 48), _master(b"b" * 48)
    assert master_check_value(a) != master_check_value(b)
    assert master_check_value(a) == master_check_value(_master(b"a" * 48))
    pw = derive_password(a, b"\0" * 32, "acme", "k1")
    try:
        assert bytes.fromhex(master_check_value(a)) not in bytes(pw.view)
    finally:
        pw.wipe()
