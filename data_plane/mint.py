"""Per-site certificates, minted in RAM (cf. mitmproxy's certs.py).

One leaf key per org per ZEN (EC P-256), replaced after ``leaf_hours``.
Minted certificates and their TLS contexts live in a bounded LRU with an
expiry. Nothing touches a file system: the TLS library wants a path, so the
PEM goes through an anonymous in-memory file (memfd) that is closed at once.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from data_plane import metrics
from data_plane.signer import LeafRequest, Signer
from keylib.names import NameConstraints

MAX_SANS = 20

TICKETS = 1
"""TLS 1.3 session tickets sent to a client after its handshake with a leaf (OpenSSL sends 2).
One lets the client resume its next connection (each resumption brings a new one), as Go's
crypto/tls does; the second cost every intercepted connection 4% of the ZEN's instructions
(bench/zen_cpu.py --callgrind: 4.00 M -> 3.83 M per new connection) and a TLS record."""


class OutsideConstraints(Exception):
    """The intermediate's name constraints do not allow a leaf for this host: none is minted."""


@dataclass
class _LeafKey:
    key: ec.EllipticCurvePrivateKey
    born: float
    public_der: bytes  # serialized once per key, not per leaf
    private_pem: bytes


@dataclass
class _Issuer:
    """An org's intermediate as parsed once (per intermediate and chain, not per leaf)."""
    not_after: dt.datetime
    constraints: NameConstraints | None
    tail_pem: bytes  # what follows the leaf: the intermediate, then issuers_to_send(chain_pem)


def split_names(host: str, origin_sans: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(dns names, ip addresses) for the leaf: the requested host first, then
    the origin's names that fit, capped."""
    dns: list[str] = []
    ips: list[str] = []
    for n in [host, *origin_sans]:
        n = n.strip().lower().rstrip(".")
        if not n:
            continue
        try:
            ipaddress.ip_address(n)
            if n not in ips:
                ips.append(n)
        except ValueError:
            if n not in dns and len(n) <= 253 and all(c.isalnum() or c in "-.*" for c in n):
                dns.append(n)
    return tuple(dns[:MAX_SANS]), tuple(ips[:MAX_SANS])


def issuers_to_send(chain_pem: str) -> bytes:
    """What a client is sent above the intermediate: the chain the CA checked (nearest issuer
    first, ending at the org's self-signed root) without the root, which the client must trust
    already (RFC 8446 4.4.2 lets a server omit it). An org whose intermediate its root signed
    directly sends nothing more; one with an issuing CA between them sends that CA, without
    which a client that trusts only the root could not build the path."""
    out = b""
    for c in x509.load_pem_x509_certificates(chain_pem.encode()) if chain_pem.strip() else []:
        if c.subject != c.issuer:
            out += c.public_bytes(serialization.Encoding.PEM)
    return out


def _memfd_context(pem: bytes, alpn: tuple[str, ...]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(list(alpn))
    ctx.num_tickets = TICKETS
    fd = os.memfd_create("keyward-leaf", os.MFD_CLOEXEC)
    try:
        os.write(fd, pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return ctx


class Minter:
    def __init__(self, *, leaf_hours: int = 24, cache_size: int = 1000) -> None:
        self._hours = leaf_hours
        self._size = cache_size
        self._keys: dict[str, _LeafKey] = {}
        self._issuers: dict[str, tuple[str, str, _Issuer]] = {}  # org: (intermediate, chain, parsed)
        self._cache: OrderedDict[tuple[str, str, str, tuple[str, ...]], tuple[ssl.SSLContext, float]] = OrderedDict()
        self._lock = threading.Lock()
        self._serial = int(time.time() * 1000) << 16

    def _leaf_key(self, org_id: str) -> _LeafKey:
        k = self._keys.get(org_id)
        if k is None or time.monotonic() - k.born > self._hours * 3600:
            key = ec.generate_private_key(ec.SECP256R1())
            k = _LeafKey(key, time.monotonic(), key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
                key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
            self._keys[org_id] = k
        return k

    def _issuer(self, org_id: str, intermediate_pem: str, chain_pem: str) -> _Issuer:
        with self._lock:
            hit = self._issuers.get(org_id)
        if hit is not None and hit[0] == intermediate_pem and hit[1] == chain_pem:
            return hit[2]
        inter = x509.load_pem_x509_certificate(intermediate_pem.encode())
        got = _Issuer(inter.not_valid_after_utc, NameConstraints.of_certificate(inter),
                      intermediate_pem.encode() + issuers_to_send(chain_pem))
        with self._lock:
            self._issuers[org_id] = (intermediate_pem, chain_pem, got)
        return got

    def cached(self, org_id: str, key_id: str, host: str, alpn: tuple[str, ...]) -> ssl.SSLContext | None:
        """The context :meth:`context_for` would return from its cache, or None (then call it, in a
        thread): a cached leaf needs no thread."""
        with self._lock:
            hit = self._cache.get((org_id, key_id, host, alpn))
            if hit and hit[1] > time.monotonic():
                self._cache.move_to_end((org_id, key_id, host, alpn))
                metrics.child(metrics.CERT_CACHE, "hit").inc()
                return hit[0]
        return None

    def context_for(self, org_id: str, key_id: str, signer: Signer, intermediate_pem: str, host: str,
                    origin_sans: list[str], alpn: tuple[str, ...] = ("http/1.1",), chain_pem: str = ""
                    ) -> ssl.SSLContext:
        """A server-side TLS context presenting a leaf for ``host``, then the intermediate and the
        issuers of ``chain_pem`` below the root (:func:`issuers_to_send`), and offering ``alpn``
        (what the origin accepted). Blocking: run it in a thread."""
        ck = (org_id, key_id, host, alpn)
        with self._lock:
            hit = self._cache.get(ck)
            if hit and hit[1] > time.monotonic():
                self._cache.move_to_end(ck)
                metrics.child(metrics.CERT_CACHE, "hit").inc()
                return hit[0]
            metrics.child(metrics.CERT_CACHE, "miss").inc()
            leaf = self._leaf_key(org_id)
            self._serial += 1
            serial = self._serial
        issuer = self._issuer(org_id, intermediate_pem, chain_pem)
        # The intermediate's own constraints, whatever the policy says: never mint outside them
        # (a client would refuse the chain anyway; the key must not even be asked to sign).
        nc = issuer.constraints
        if nc is not None and not nc.allows(host):
            raise OutsideConstraints(f"{host} is outside the name constraints of {org_id}'s intermediate")
        now = dt.datetime.now(dt.UTC)
        not_after = min(now + dt.timedelta(hours=self._hours), issuer.not_after)
        dns, ips = split_names(host, [n for n in origin_sans if nc is None or nc.allows(n)])
        der = signer.sign(LeafRequest(common_name=host[:64], dns_names=dns, ip_addresses=ips,
                                      public_key_der=leaf.public_der,
                                      not_before=now - dt.timedelta(hours=1), not_after=not_after, serial=serial))
        pem = ssl.DER_cert_to_PEM_cert(der).encode() + issuer.tail_pem + leaf.private_pem
        ctx = _memfd_context(pem, alpn)
        ttl = max(60.0, (not_after - now).total_seconds() - 300)
        with self._lock:
            self._cache[ck] = (ctx, time.monotonic() + ttl)
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return ctx

    def forget(self, org_id: str) -> None:
        """Drop an org's minted certificates and leaf key (key dropped, rotated or revoked)."""
        with self._lock:
            for k in [k for k in self._cache if k[0] == org_id]:
                del self._cache[k]
            self._keys.pop(org_id, None)
            self._issuers.pop(org_id, None)
