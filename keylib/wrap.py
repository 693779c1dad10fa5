"""Sealing (CA side): encrypt a private key the moment it exists.

This module can only encrypt. The opening side is :mod:`keylib.unwrap`,
which the Central Authority never imports.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keylib.envelope import NONCE_LENGTH, Envelope, aad
from keylib.kdf import SALT_LENGTH, derive_password
from keylib.master import MasterSecret


def seal(
    master: MasterSecret,
    *,
    org_id: str,
    key_id: str,
    spki_sha256: bytes,
    plaintext: bytes | bytearray | memoryview,
) -> bytes:
    """Return the envelope of ``plaintext`` bound to org, key id and public key.

    A fresh random salt gives a fresh password per key; a fresh nonce is
    used once under it.
    """
    salt = os.urandom(SALT_LENGTH)
    nonce = os.urandom(NONCE_LENGTH)
    with derive_password(master, salt, org_id, key_id) as password:
        ciphertext = AESGCM(password.view).encrypt(nonce, plaintext, aad(org_id, key_id, spki_sha256))
    return Envelope(salt=salt, nonce=nonce, ciphertext=ciphertext).encode()
