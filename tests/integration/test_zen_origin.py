"""The ZEN verifies an intercepted origin under the name the leaf will carry, not only its chain.

The origin here presents a certificate from a root the ZEN trusts (the test web root, an extra
root), but for good.test, dni.test, blocked.test and www.good.test only. Reached as other.test
(which the ZEN resolves to that same origin), it has proved nothing about other.test: a chain
check alone would let it through, and the ZEN would mint other.test a leaf from the org's
intermediate, vouching for a server that is not other.test.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import CAProcess, Clients, OrgRoot
from tests.integration.flow import PROXY_SECRET
from tests.integration.test_zen import Web, Zen, org, start_zen, web  # noqa: F401 (fixtures)

RESOLVE = "*.good.test=127.0.0.1,dni.test=127.0.0.1,blocked.test=127.0.0.1,bad.test=127.0.0.1,other.test=127.0.0.1"
"""good.test and every name below it by one wildcard entry."""


@pytest.fixture(scope="module")
def zen(ca: CAProcess, pki_dir: Path, master_secret: tuple[bytes, Path], web: Web, workdir: Path,  # noqa: F811
        org: tuple[str, OrgRoot, Clients]) -> Iterator[Zen]:  # noqa: F811
    z = start_zen(ca, pki_dir, master_secret[1], web, workdir, extra={"KEYWARD_ZEN_RESOLVE": RESOLVE})
    yield z
    z.proc.terminate()
    z.proc.wait(15)


def _curl(zen: Zen, org_id: str, url: str, cacert: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "--max-time", "20", "--proxy", f"http://127.0.0.1:{zen.port}",
                           "--proxy-user", f"{org_id}:{PROXY_SECRET}", "--cacert", str(cacert), *args,
                           "-w", "\n%{http_code}", url], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("alpn", [[], ["--http1.1"]], ids=["h2-offered", "http1.1-only"])
def test_an_origin_trusted_but_for_another_name_is_refused(
    zen: Zen, web: Web, org: tuple[str, OrgRoot, Clients], alpn: list[str],  # noqa: F811
) -> None:
    org_id, root, _ = org
    # The same origin under a name its certificate lists: intercepted and served.
    r = _curl(zen, org_id, f"https://good.test:{web.port}/hello", root.crt, *alpn)
    assert r.returncode == 0 and r.stdout.endswith("200") and "hello from good.test" in r.stdout, (r.stdout, r.stderr)
    # Under a name it does not list: refused, the client reads why (a 502 page over TLS under a leaf
    # for the name it asked for), and nothing of the origin's answer.
    r = _curl(zen, org_id, f"https://other.test:{web.port}/hello", root.crt, *alpn)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("502") and "is not trusted" in r.stdout, (r.stdout, r.stderr)
    assert "hello from" not in r.stdout and "other.test" in r.stdout


def test_a_wildcard_resolve_entry_reaches_the_origin_under_every_name_below_its_domain(
    zen: Zen, web: Web, org: tuple[str, OrgRoot, Clients],  # noqa: F811
) -> None:
    org_id, root, _ = org
    for name in ("good.test", "www.good.test"):  # names the origin's certificate lists
        r = _curl(zen, org_id, f"https://{name}:{web.port}/w", root.crt)
        assert r.returncode == 0 and r.stdout.endswith("200") and f"hello from {name}" in r.stdout, (r.stdout, r.stderr)
    # A name below it that the certificate does not list: reached (no DNS lookup failed), then
    # refused under that name, as any origin that proves another name.
    r = _curl(zen, org_id, f"https://a.b.good.test:{web.port}/w", root.crt)
    assert r.returncode == 0 and r.stdout.endswith("502") and "is not trusted" in r.stdout, (r.stdout, r.stderr)
