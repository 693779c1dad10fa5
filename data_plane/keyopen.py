"""Open an org key received from the CA, the way a ZEN does.

The CA sends the key sealed (see keylib). The ZEN derives the same password
from the master secret in its own locked memory, opens the envelope into a
locked buffer with ``AESGCM.decrypt_into``, and checks that the key is the
one of the intermediate certificate before using it. The plaintext never
leaves the locked buffer except into the TLS library's key object.
"""

from __future__ import annotations

from cryptography import x509

import keylib
from keylib.envelope import spki_sha256
from keylib.errors import EnvelopeError
from keylib.master import MasterSecret
from keylib.securemem import LockedBuffer
from keylib.unwrap import open_sealed


def open_org_key(
    master: MasterSecret,
    *,
    org_id: str,
    key_id: str,
    keylib_format: str,
    sealed: bytes,
    certificate_pem: str,
) -> LockedBuffer:
    """Return the org's PKCS#8 DER key in a locked buffer (caller wipes).

    The AAD's public-key fingerprint is computed from the certificate, not
    taken from the wire, so a key is opened only for the certificate it
    belongs to.
    """
    if keylib_format != keylib.FORMAT:
        raise EnvelopeError(f"key format {keylib_format!r} is not supported (this ZEN reads {keylib.FORMAT})")
    cert = x509.load_pem_x509_certificate(certificate_pem.encode())
    return open_sealed(master, sealed, org_id=org_id, key_id=key_id, spki_sha256=spki_sha256(cert.public_key()))
