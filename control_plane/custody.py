"""Key custody (pure, no I/O): generate an intermediate key and seal it at once.

The private key exists in plaintext only inside :func:`new_pending_key`:
it is serialized to PKCS#8 DER, sealed with :func:`keylib.wrap.seal`
(AES-256-GCM under a password derived in locked memory), and the DER is
zeroed, before the CSR is signed and before anything is returned or stored.
The CA keeps only the envelope. It has no way to open it (see keylib.guard).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization

import keylib
from control_plane.certs import KeyAlgorithm, build_csr, generate_key, spki_sha256
from keylib.master import MasterSecret
from keylib.names import NameConstraints
from keylib.securemem import wipe_bytes
from keylib.wrap import seal


@dataclass(frozen=True)
class PendingKey:
    key_id: str
    org_id: str
    algorithm: KeyAlgorithm
    sealed: bytes
    keylib_format: str
    spki_sha256: bytes
    csr_pem: str

    def __repr__(self) -> str:  # the envelope is not secret, but keep logs small
        return f"PendingKey(key_id={self.key_id!r}, org_id={self.org_id!r}, algorithm={self.algorithm.value})"


def new_pending_key(
    master: MasterSecret,
    *,
    org_id: str,
    algorithm: KeyAlgorithm,
    common_name: str,
    organization: str,
    constraints: NameConstraints | None = None,
) -> PendingKey:
    key_id = str(uuid.uuid4())
    key = generate_key(algorithm)
    fp = spki_sha256(key.public_key())
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        sealed = seal(master, org_id=org_id, key_id=key_id, spki_sha256=fp, plaintext=der)
    finally:
        wipe_bytes(der)
        del der
    csr = build_csr(key, common_name=common_name, organization=organization, constraints=constraints).decode()
    del key  # OpenSSL clears private key material when the object is freed
    return PendingKey(key_id=key_id, org_id=org_id, algorithm=algorithm, sealed=sealed,
                      keylib_format=keylib.FORMAT, spki_sha256=fp, csr_pem=csr)
