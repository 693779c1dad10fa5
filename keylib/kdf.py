"""Derivation of a key's wrapping key (the seed's "password").

KDF (documented in docs/key-custody.md):

    password = HKDF-SHA256(
        ikm  = master secret,
        salt = 32 random bytes stored with the sealed key,
        info = "keyward-keylib/1 wrap" || 0x00 || lp(org_id) || lp(key_id),
        L    = 32)                                  -> AES-256-GCM key

where ``lp(x)`` is a 2-byte big-endian length followed by UTF-8 ``x``. The
result is written straight into a :class:`LockedBuffer` with
``HKDF.derive_into`` and wiped by the caller; it is never stored or sent.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keylib.errors import EnvelopeError
from keylib.master import MasterSecret
from keylib.securemem import LockedBuffer

KEY_LENGTH = 32
SALT_LENGTH = 32
_INFO_PREFIX = b"keyward-keylib/1 wrap\x00"


def lp(value: str) -> bytes:
    """Length-prefixed UTF-8, so that ("ab","c") and ("a","bc") differ."""
    raw = value.encode()
    if len(raw) > 0xFFFF:
        raise EnvelopeError("identifier too long to bind")
    return len(raw).to_bytes(2, "big") + raw


def derive_password(master: MasterSecret, salt: bytes, org_id: str, key_id: str) -> LockedBuffer:
    """Return the per-key AES-256 key in a new locked buffer (caller wipes)."""
    if len(salt) != SALT_LENGTH:
        raise EnvelopeError(f"salt must be {SALT_LENGTH} bytes")
    out = LockedBuffer(KEY_LENGTH)
    try:
        HKDF(
            algorithm=hashes.SHA256(),
            length=KEY_LENGTH,
            salt=salt,
            info=_INFO_PREFIX + lp(org_id) + lp(key_id),
        ).derive_into(master.view, out.view)
    except BaseException:
        out.wipe()
        raise
    return out
