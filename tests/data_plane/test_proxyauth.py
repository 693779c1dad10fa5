"""data_plane.proxyauth: credentials checked, remembered, and failures budgeted per source."""

from __future__ import annotations

import asyncio
import base64

from data_plane.policy import OrgPolicy
from data_plane.proxyauth import ProxyAuth, Verdict, basic_credentials
from keylib import proxyauth

SECRET = "a-proxy-credential-of-the-org"
POLICY = OrgPolicy("acme", proxy_verifiers=(proxyauth.make(SECRET, iterations=10_000),))


def _b(s: str) -> str:
    return "Basic " + base64.b64encode(s.encode()).decode()


def test_basic_credentials() -> None:
    assert basic_credentials(_b("acme:s:with:colons")) == ("acme", "s:with:colons")
    assert basic_credentials(_b("acme")) is None  # no colon: no secret given
    assert basic_credentials("Basic !!!") is None
    assert basic_credentials("Bearer x") is None
    assert basic_credentials(None) is None


def test_a_name_alone_or_a_wrong_secret_is_refused() -> None:
    async def go() -> None:
        a = ProxyAuth()
        assert await a.check(POLICY, SECRET, "10.0.0.1") is Verdict.OK
        assert await a.check(POLICY, "", "10.0.0.1") is Verdict.BAD
        assert await a.check(POLICY, "x" * 20, "10.0.0.1") is Verdict.BAD
        assert await a.check(None, SECRET, "10.0.0.1") is Verdict.BAD  # an org this ZEN does not serve
        assert await a.check(OrgPolicy("net-only"), SECRET, "10.0.0.1") is Verdict.BAD  # no verifier
    asyncio.run(go())


def test_failures_are_budgeted_per_source_and_successes_remembered() -> None:
    async def go() -> None:
        a = ProxyAuth(fail_rate=0.001, fail_burst=3)
        assert await a.check(POLICY, SECRET, "10.0.0.1") is Verdict.OK  # remembered from now on
        got = [await a.check(POLICY, f"guess-{i}-xxxxxxxxxxxx", "10.0.0.9") for i in range(5)]
        assert got == [Verdict.BAD] * 3 + [Verdict.THROTTLED] * 2
        # A throttled source cannot even try the right secret unless it is remembered...
        assert await a.check(POLICY, SECRET, "10.0.0.9") is Verdict.OK  # (remembered: no KDF run)
        other = ProxyAuth(fail_rate=0.001, fail_burst=1)
        await other.check(POLICY, "wrong-wrong-wrong-wrong", "10.0.0.9")
        assert await other.check(POLICY, SECRET, "10.0.0.9") is Verdict.THROTTLED
        # ...and another source is not affected.
        assert await other.check(POLICY, SECRET, "10.0.0.2") is Verdict.OK
        # A changed verifier list forgets what was remembered.
        changed = OrgPolicy("acme", proxy_verifiers=(proxyauth.make("another-secret-entirely", iterations=10_000),))
        assert await a.check(changed, SECRET, "10.0.0.1") is Verdict.BAD
    asyncio.run(go())
