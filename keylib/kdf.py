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

Check value of the master secret (:func:`master_check_value`), as HSM key
ceremonies print a key check value (KCV) to compare two copies of a key
without showing either:

    check_key = HKDF-SHA256(ikm = master secret, salt = none,
                            info = "keyward master check v1", L = 32)
    KCV       = hex(HMAC-SHA256(check_key, "keyward master check value")[:8])

The CA reports it and a ZEN compares it with its own at start: two processes
whose values differ hold different secrets, and the ZEN could open no key.
It reveals nothing usable: HKDF under an info label of its own makes
``check_key`` independent of every wrapping key (they use other labels, and
a salt of their own each), so the KCV says nothing about any of them; and
getting from 8 bytes of HMAC output back to ``check_key``, let alone to the
secret behind it, means breaking HMAC-SHA256 and HKDF. What remains is a test
for a guessed secret, worthless against >= 32 random bytes (2^256 guesses).
64 bits make a match by chance between two different secrets a 2^-64 event.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keylib.errors import EnvelopeError
from keylib.master import MasterSecret
from keylib.securemem import LockedBuffer

KEY_LENGTH = 32
SALT_LENGTH = 32
_INFO_PREFIX = b"keyward-keylib/1 wrap\x00"
_CHECK_INFO = b"keyward master check v1"
_CHECK_MESSAGE = b"keyward master check value"
CHECK_LENGTH = 8


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


def master_check_value(master: MasterSecret) -> str:
    """The master secret's check value: 16 hex digits, not secret (see the module)."""
    key = LockedBuffer(KEY_LENGTH, require_lock=False)  # wiped at once; the secret itself is locked
    try:
        HKDF(algorithm=hashes.SHA256(), length=KEY_LENGTH, salt=None, info=_CHECK_INFO).derive_into(
            master.view, key.view)
        mac = hmac.HMAC(key.view, hashes.SHA256())
        mac.update(_CHECK_MESSAGE)
        return mac.finalize()[:CHECK_LENGTH].hex()
    finally:
        key.wipe()
