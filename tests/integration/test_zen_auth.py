"""Proxy authentication at the ZEN (issue 10, finding 5).

Once, the proxy user named the org and no password was checked: ten org names
started ten signers (+380 MB of locked RAM). Now an org is chosen by its
source network or by a credential checked against its policy's verifiers; a
name alone opens nothing, failures are budgeted per source, and open keys are
capped (least recently used first).
"""

from __future__ import annotations

import base64
import json
import socket
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import CAProcess, Clients, OrgRoot, wait_for
from tests.integration.flow import PROXY_SECRET, activate, create_org, org_admin
from tests.integration.test_zen import Web, Zen, curl, in_log, start_zen, web  # noqa: F401 (fixture)


def _metrics_port(zen: Zen) -> int:
    for line in zen.log.read_text().splitlines():
        if '"metrics listening"' in line:
            return int(json.loads(line[line.index("{"):])["port"])
    raise AssertionError("the ZEN logged no metrics port")


def _metric(zen: Zen, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{_metrics_port(zen)}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def _connect(zen: Zen, web: Web, auth: str | None, source: str = "127.0.0.1") -> str:  # noqa: F811 (the fixture's value)
    """The status line a raw CONNECT gets."""
    with socket.create_connection(("127.0.0.1", zen.port), timeout=20, source_address=(source, 0)) as s:
        extra = f"Proxy-Authorization: Basic {base64.b64encode(auth.encode()).decode()}\r\n" if auth else ""
        s.sendall(f"CONNECT good.test:{web.port} HTTP/1.1\r\nHost: good.test\r\n{extra}\r\n".encode())
        got = b""
        while b"\r\n" not in got:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    return got.split(b"\r\n", 1)[0].decode()


@pytest.fixture(scope="module")
def orgs(ca: CAProcess, platform: Clients, pki_dir: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> list[tuple[str, OrgRoot]]:
    """Three orgs with active keys, served by the public pool."""
    out = []
    for _ in range(3):
        org_id = f"a-{uuid.uuid4().hex[:8]}"
        create_org(platform, org_id)
        root = OrgRoot.create(tmp_path_factory.mktemp("aroot"), org_id)
        activate(org_admin(ca.addr, pki_dir, org_id), root, org_id)
        out.append((org_id, root))
    return out


@pytest.fixture
def zen2(ca: CAProcess, pki_dir: Path, master_secret: tuple[bytes, Path], web: Web, workdir: Path  # noqa: F811
         ) -> Iterator[Zen]:
    """A ZEN that may hold two keys at once."""
    z = start_zen(ca, pki_dir, master_secret[1], web, workdir, extra={"KEYWARD_ZEN_MAX_KEYS": "2"})
    yield z
    z.proc.terminate()
    z.proc.wait(15)


def test_org_names_without_their_credential_open_no_key(
    zen2: Zen, web: Web, orgs: list[tuple[str, OrgRoot]], platform: Clients,  # noqa: F811
) -> None:
    names = [o for o, _ in orgs]
    # Every served org is known to the ZEN (its policy came with the watch snapshot).
    wait_for(lambda: _metric(zen2, "keyward_zen_ca_reachable") == 1, 30, "the ZEN to reach the CA")
    attempts = [None, *(f"{n}:" for n in names), *(f"{n}:wrong-{n}" for n in names), *(f"{n}:x" for n in names)]
    answers = [_connect(zen2, web, a) for a in attempts]
    assert all(" 407 " in a for a in answers), answers
    assert _metric(zen2, "keyward_zen_keys_held") == 0
    assert _metric(zen2, 'keyward_zen_key_fetches_total') == 0  # no key fetched to be opened
    # The right credential opens exactly that org's key.
    r = curl(zen2, names[0], f"https://good.test:{web.port}/ok", orgs[0][1].crt)
    assert r.returncode == 0 and r.stdout.endswith("200"), r.stderr
    assert _metric(zen2, "keyward_zen_keys_held") == 1


def test_failed_credentials_are_budgeted_per_source(zen2: Zen, web: Web, orgs: list[tuple[str, OrgRoot]]) -> None:  # noqa: F811
    org_id = orgs[0][0]
    answers = [_connect(zen2, web, f"{org_id}:guess-{i}") for i in range(25)]
    assert " 429 " in answers[-1], answers[-3:]
    assert sum(" 407 " in a for a in answers) <= 12  # the burst, then refused unchecked
    assert _metric(zen2, 'keyward_zen_proxy_auth_total{result="throttled"}') >= 10
    # The right secret, from the same source, while throttled: a remembered success stays valid,
    # and a first success is still refused until the budget refills (so guessing gains nothing).
    assert " 200 " in _connect(zen2, web, f"{org_id}:{PROXY_SECRET}") or " 429 " in _connect(
        zen2, web, f"{org_id}:{PROXY_SECRET}")


def test_open_keys_are_capped_least_recently_used_first(
    zen2: Zen, web: Web, orgs: list[tuple[str, OrgRoot]],  # noqa: F811
) -> None:
    for org_id, root in orgs:  # three orgs through a ZEN that holds two keys
        r = curl(zen2, org_id, f"https://good.test:{web.port}/{org_id}", root.crt)
        assert r.returncode == 0 and r.stdout.endswith("200"), r.stderr
    assert _metric(zen2, "keyward_zen_keys_held") == 2
    assert _metric(zen2, "keyward_zen_signers_evicted_total") == 1
    in_log(zen2, f"dropped key of {orgs[0][0]} (least recently used of 2 open keys)")
    # The dropped org still works: its key is opened again (and another goes).
    r = curl(zen2, orgs[0][0], f"https://good.test:{web.port}/again", orgs[0][1].crt)
    assert r.returncode == 0 and r.stdout.endswith("200"), r.stderr


def test_source_network_alone_still_identifies_an_org_without_credentials(
    ca: CAProcess, platform: Clients, pki_dir: Path, master_secret: tuple[bytes, Path], web: Web,  # noqa: F811
    workdir: Path, tmp_path: Path,
) -> None:
    org_id = f"n-{uuid.uuid4().hex[:8]}"
    # 127.0.0.3: every other test connects from 127.0.0.1, and every ZEN learns of this org.
    create_org(platform, org_id, location_cidrs=["127.0.0.3/32"], proxy_credential_verifiers=[])
    root = OrgRoot.create(tmp_path, org_id)
    activate(org_admin(ca.addr, pki_dir, org_id), root, org_id)
    z = start_zen(ca, pki_dir, master_secret[1], web, workdir)
    try:
        wait_for(lambda: " 200 " in _connect(z, web, None, source="127.0.0.3"), 30,
                 "the ZEN to learn the org's networks")
        assert " 407 " in _connect(z, web, None)  # from another address: who are you?
    finally:
        z.proc.terminate()
        z.proc.wait(15)
