"""Proxy credentials: the one definition of their verifier (pure, stdlib only).

An org's users authenticate to a ZEN as ``org_id:secret`` (HTTP Basic on
Proxy-Authorization). Neither the CA nor a ZEN ever stores the secret: the org
admin puts a *verifier* into the org's policy, the CA checks its form, and
ZENs check secrets against it in constant time. The format is the common
``pbkdf2-sha256$<iterations>$<salt, base64>$<hash, base64>`` (as Django and
passlib write it), so a verifier can be made with any tool, or with
``keyward proxy-verifier``.

PBKDF2 makes each guess cost; the ZEN caches successful checks and budgets
failed ones per source, so the cost is paid once per secret, not per connection.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass

SCHEME = "pbkdf2-sha256"
DEFAULT_ITERATIONS = 100_000
"""About 40 ms on one core here: slow for a guesser, paid once per secret by a ZEN (cached)."""
MIN_ITERATIONS = 10_000
MAX_ITERATIONS = 2_000_000
"""Bounded: a verifier from a policy must not let an org admin make every ZEN spin."""
MIN_SECRET_BYTES = 16


class VerifierError(ValueError):
    """The verifier is not in the expected form; the message says what to fix."""


@dataclass(frozen=True)
class Verifier:
    iterations: int
    salt: bytes
    digest: bytes


def parse(text: str) -> Verifier:
    parts = text.split("$")
    if len(parts) != 4 or parts[0] != SCHEME:
        raise VerifierError(f"a proxy credential verifier must read {SCHEME}$<iterations>$<salt>$<hash> "
                            "(base64); make one with `keyward proxy-verifier`")
    try:
        iterations = int(parts[1])
        salt = base64.b64decode(parts[2], validate=True)
        digest = base64.b64decode(parts[3], validate=True)
    except (ValueError, binascii.Error):
        raise VerifierError("a proxy credential verifier's iterations must be a number and its salt and hash "
                            "base64") from None
    if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
        raise VerifierError(f"a proxy credential verifier needs {MIN_ITERATIONS}..{MAX_ITERATIONS} iterations, "
                            f"not {iterations}")
    if len(salt) < 16 or len(salt) > 64 or len(digest) != 32:
        raise VerifierError("a proxy credential verifier needs a salt of 16..64 bytes and a 32-byte hash")
    return Verifier(iterations, salt, digest)


def make(secret: str, *, iterations: int = DEFAULT_ITERATIONS) -> str:
    """A verifier for ``secret`` (which must be long enough to resist guessing offline)."""
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise VerifierError(f"a proxy credential must be at least {MIN_SECRET_BYTES} bytes")
    salt = os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, iterations)
    return f"{SCHEME}${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check(secret: str, verifier: Verifier) -> bool:
    """True when ``secret`` matches; the comparison takes the same time whatever the bytes."""
    got = hashlib.pbkdf2_hmac("sha256", secret.encode(), verifier.salt, verifier.iterations)
    return hmac.compare_digest(got, verifier.digest)
