"""Caller identity from an mTLS client certificate (pure).

The TLS layer has already checked the chain to our client trust anchors.
This module adds the rules TLS does not know:

* exactly one URI SAN, of the form ``spiffe://<trust-domain>/<path>``;
* the trust domain is ours;
* the certificate is not a CA (``BasicConstraints ca=FALSE`` or absent);
* it is valid now (checked again, so the clock rule is ours, not implicit);
* the path names a known role:

    platform-admin            the platform's operators
    org-admin/<org_id>        an org's admin (its own org only)
    zen-pool/<pool>           a ZEN of a registered pool
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass
from enum import Enum

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from common.ids import ID_RULE, is_id
from control_plane.errors import InvalidArgument, Unauthenticated, show


class Role(Enum):
    PLATFORM_ADMIN = "platform-admin"
    ORG_ADMIN = "org-admin"
    ZEN_POOL = "zen-pool"


@dataclass(frozen=True)
class Identity:
    spiffe_id: str
    role: Role
    #: org id for ORG_ADMIN, pool name for ZEN_POOL, "" for PLATFORM_ADMIN.
    subject: str

    def __str__(self) -> str:
        return self.spiffe_id


def from_certificate(pem: bytes, *, trust_domain: str, now: dt.datetime | None = None) -> Identity:
    """Return the caller's identity or raise :class:`Unauthenticated`."""
    not_before, not_after, found = _examine(pem, trust_domain)
    if not_before is None or not_after is None:
        raise Unauthenticated(str(found))  # unparseable: no validity to check
    now = now or dt.datetime.now(dt.UTC)
    if not not_before <= now <= not_after:
        raise Unauthenticated("client certificate is expired or not yet valid")
    if isinstance(found, str):  # a new exception each time: a cached one would grow its traceback
        raise Unauthenticated(found)
    return found


@functools.lru_cache(maxsize=4096)
def _examine(pem: bytes, trust_domain: str
             ) -> tuple[dt.datetime | None, dt.datetime | None, Identity | str]:
    """What a certificate says, whenever it is asked (validity, then identity or why none): parsed
    once per certificate, not on every call (a ZEN's connection presents the same one each time;
    parsing was 4% of the CA's CPU per GetKeyPair). The clock is read by the caller, each call."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None, None, "client certificate cannot be parsed"
    window = cert.not_valid_before_utc, cert.not_valid_after_utc
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            return (*window, "a CA certificate cannot be used as a client identity")
    except x509.ExtensionNotFound:
        pass
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        return (*window, f"client certificate must carry exactly one URI SAN (spiffe://{trust_domain}/...), "
                f"found {len(uris)}")
    try:
        return (*window, parse_spiffe_id(uris[0], trust_domain=trust_domain))
    except Unauthenticated as e:
        return (*window, str(e))


def parse_spiffe_id(uri: str, *, trust_domain: str) -> Identity:
    prefix = f"spiffe://{trust_domain}/"
    if not uri.startswith("spiffe://"):
        raise Unauthenticated("client identity is not a spiffe:// URI")
    if not uri.startswith(prefix):
        raise Unauthenticated(f"client identity is not in trust domain {trust_domain!r}")
    parts = uri[len(prefix):].split("/")
    if parts == ["platform-admin"]:
        return Identity(uri, Role.PLATFORM_ADMIN, "")
    if len(parts) == 2 and parts[0] in ("org-admin", "zen-pool") and is_id(parts[1]):
        return Identity(uri, Role(parts[0]), parts[1])
    raise Unauthenticated(
        "client identity names no known role (platform-admin, org-admin/<org>, zen-pool/<pool>)"
    )


def check_id(value: str, what: str) -> str:
    """Validate an org id or pool name (before any lookup, so a malformed id
    is refused the same way whether or not anything by that name exists)."""
    if not is_id(value):
        raise InvalidArgument(f"{what} {show(value)} is not valid: {ID_RULE}")
    return value


def describe_certificate(pem: bytes) -> str:
    """What an audit row says of a refused client certificate: its SHA-256 fingerprint and URI SANs
    (so a refusal points at one certificate), never more than a line."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return "an unparseable certificate"
    fp = cert.fingerprint(hashes.SHA256()).hex()
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    shown = ", ".join(show(u)[:120] for u in uris[:4]) or "none"
    return f"certificate sha256:{fp}, URI SANs: {shown}"
