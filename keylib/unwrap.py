"""Opening (ZEN side only): decrypt a sealed key into locked memory.

The Central Authority never imports this module (import-linter contract
``ca-never-decrypts`` and :func:`keylib.guard.forbid_unwrap`).
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keylib.envelope import aad, decode
from keylib.errors import EnvelopeError
from keylib.kdf import derive_password
from keylib.master import MasterSecret
from keylib.securemem import LockedBuffer


def open_sealed(
    master: MasterSecret,
    sealed: bytes,
    *,
    org_id: str,
    key_id: str,
    spki_sha256: bytes,
) -> LockedBuffer:
    """Return the plaintext (PKCS#8 DER) in a new locked buffer; caller wipes.

    Raises :class:`EnvelopeError` if the envelope does not open: wrong org,
    key id, public key or master secret, or tampered bytes.
    """
    env = decode(sealed)
    out = LockedBuffer(env.plaintext_length)
    try:
        with derive_password(master, env.salt, org_id, key_id) as password:
            AESGCM(password.view).decrypt_into(
                env.nonce, env.ciphertext, aad(org_id, key_id, spki_sha256), out.view
            )
    except InvalidTag:
        out.wipe()
        raise EnvelopeError(
            f"sealed key {key_id!r} of org {org_id!r} does not open: it belongs to "
            "another org, key or public key, the master secret differs, or it was altered"
        ) from None
    except BaseException:
        out.wipe()
        raise
    return out
