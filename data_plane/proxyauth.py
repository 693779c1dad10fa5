"""Proxy authentication at the ZEN: ``org_id:secret`` checked against the org's verifiers.

Contract:
* An org is chosen by the caller's source network (``policy.org_for``) or by
  a credential that matches one of the org's verifiers (``keylib.proxyauth``),
  never by a name alone: an org's key is opened only for a caller who
  authenticated as that org.
* A checked secret is remembered (a digest, bounded LRU), so the PBKDF2 cost
  is paid once per secret, not per connection; a changed verifier list
  invalidates it.
* Failed checks are budgeted per source address (token bucket): beyond it the
  answer is THROTTLED at once, with no KDF run, so guessing costs the guesser.
  KDF runs happen in a worker thread, one at a time, off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import time
from collections import OrderedDict
from enum import Enum

from data_plane.policy import OrgPolicy
from keylib import proxyauth


class Verdict(Enum):
    OK = "ok"
    BAD = "bad"              # unknown org, no verifier, or wrong secret
    THROTTLED = "throttled"  # too many failures from this source: not even checked


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """(user, secret) of a ``Basic`` Proxy-Authorization value, or None."""
    if not header or header[:6].lower() != "basic ":
        return None
    try:
        user, sep, secret = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    return (user, secret) if sep else None


class ProxyAuth:
    def __init__(self, *, cache_size: int = 4096, fail_rate: float = 2.0, fail_burst: int = 10,
                 sources: int = 10000) -> None:
        self._ok: OrderedDict[bytes, None] = OrderedDict()
        self._cache_size = cache_size
        self._rate, self._burst, self._sources = fail_rate, float(fail_burst), sources
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._kdf = asyncio.Semaphore(1)
        self._parsed: dict[str, proxyauth.Verifier | None] = {}

    def take(self, source: str) -> bool:
        """Spend one failure token of ``source`` up front (for a lookup a guess could cause); False
        when it has none left. Given back by a later success."""
        return self._take(source, time.monotonic())

    def _take(self, source: str, now: float) -> bool:
        tokens, then = self._buckets.pop(source, (self._burst, now))
        tokens = min(self._burst, tokens + (now - then) * self._rate)
        ok = tokens >= 1.0
        self._buckets[source] = (tokens - 1.0 if ok else tokens, now)
        while len(self._buckets) > self._sources:
            self._buckets.popitem(last=False)
        return ok

    def _refund(self, source: str) -> None:
        if source in self._buckets:
            tokens, then = self._buckets[source]
            self._buckets[source] = (min(self._burst, tokens + 1.0), then)

    def _verifier(self, text: str) -> proxyauth.Verifier | None:
        if text not in self._parsed:
            if len(self._parsed) > 4096:
                self._parsed.clear()
            try:
                self._parsed[text] = proxyauth.parse(text)
            except proxyauth.VerifierError:
                self._parsed[text] = None  # the CA validates verifiers; a bad one matches nothing
        return self._parsed[text]

    async def check(self, policy: OrgPolicy | None, secret: str, source: str) -> Verdict:
        if policy is None or not policy.proxy_verifiers or not secret:
            return Verdict.BAD
        key = hashlib.sha256("\0".join((policy.org_id, *policy.proxy_verifiers, secret)).encode()).digest()
        if key in self._ok:
            self._ok.move_to_end(key)
            return Verdict.OK
        if not self._take(source, time.monotonic()):
            return Verdict.THROTTLED
        verifiers = [v for v in map(self._verifier, policy.proxy_verifiers) if v is not None]
        async with self._kdf:
            ok = await asyncio.to_thread(lambda: any(proxyauth.check(secret, v) for v in verifiers))
        if not ok:
            return Verdict.BAD
        self._refund(source)
        self._ok[key] = None
        while len(self._ok) > self._cache_size:
            self._ok.popitem(last=False)
        return Verdict.OK
