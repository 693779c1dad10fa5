"""The sealed-key envelope (format ``keyward-keylib/1``), pure functions.

    envelope = b"KWK1" || salt(32) || nonce(12) || AES-256-GCM(ciphertext || tag)
    aad      = b"keyward-keylib/1 aad\x00" || lp(org_id) || lp(key_id) || spki_sha256(32)

The AAD binds the ciphertext to its org, its key id and its public key, so a
ciphertext copied to another row or org fails to open. ``spki_sha256`` is
:func:`spki_sha256`: the CA seals with it (of the key it generated), a ZEN opens
with it (of the certificate the CA sent); a key opens only if both compute it
the same way, hence one definition, here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from keylib.errors import EnvelopeError
from keylib.kdf import SALT_LENGTH, lp

MAGIC = b"KWK1"
NONCE_LENGTH = 12
TAG_LENGTH = 16
_AAD_PREFIX = b"keyward-keylib/1 aad\x00"
#: Upper bound on a sealed key: an RSA-4096 PKCS#8 DER is ~2.4 KiB.
MAX_ENVELOPE = 16 * 1024


@dataclass(frozen=True)
class Envelope:
    salt: bytes
    nonce: bytes
    ciphertext: bytes  # includes the GCM tag

    def encode(self) -> bytes:
        return MAGIC + self.salt + self.nonce + self.ciphertext

    @property
    def plaintext_length(self) -> int:
        return len(self.ciphertext) - TAG_LENGTH


def decode(data: bytes) -> Envelope:
    if len(data) > MAX_ENVELOPE:
        raise EnvelopeError("sealed key is larger than any key keylib writes")
    head = len(MAGIC) + SALT_LENGTH + NONCE_LENGTH
    if len(data) < head + TAG_LENGTH + 1:
        raise EnvelopeError("sealed key is truncated")
    if data[: len(MAGIC)] != MAGIC:
        raise EnvelopeError("sealed key has an unknown format (expected keyward-keylib/1)")
    salt = data[len(MAGIC) : len(MAGIC) + SALT_LENGTH]
    nonce = data[len(MAGIC) + SALT_LENGTH : head]
    return Envelope(salt=bytes(salt), nonce=bytes(nonce), ciphertext=bytes(data[head:]))


def aad(org_id: str, key_id: str, spki_sha256: bytes) -> bytes:
    if len(spki_sha256) != 32:
        raise EnvelopeError("public key fingerprint must be a SHA-256 digest")
    return _AAD_PREFIX + lp(org_id) + lp(key_id) + spki_sha256


def spki_sha256(public_key: PublicKeyTypes) -> bytes:
    """The public-key fingerprint the AAD binds: SHA-256 of the key's DER SubjectPublicKeyInfo."""
    return hashlib.sha256(public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).digest()
