"""A real ZEN (`python -m data_plane`) with KEYWARD_ZEN_WORKERS=2, keys from a real CA: two
worker processes share its listening socket, the org key stays in one signer process (the
supervisor's child, not a worker's), /healthz says how many workers run, /metrics sums theirs,
and a policy change at the CA reaches every worker."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from protos.keyward.v1 import keyward_pb2 as pb
from tests.helpers import CAProcess, Clients, OrgRoot
from tests.integration.flow import PROXY_VERIFIER
from tests.integration.test_zen import Web, Zen, curl, org, start_zen, web  # noqa: F401 (fixtures)
from tests.integration.test_zen_auth import _metric, _metrics_port


@pytest.fixture(scope="module")
def zen(ca: CAProcess, pki_dir: Path, master_secret: tuple[bytes, Path], web: Web, workdir: Path,  # noqa: F811
        org: tuple[str, OrgRoot, Clients]) -> Iterator[Zen]:  # noqa: F811
    z = start_zen(ca, pki_dir, master_secret[1], web, workdir, extra={"KEYWARD_ZEN_WORKERS": "2"})
    yield z
    z.proc.terminate()
    z.proc.wait(15)


def _children(pid: int) -> dict[int, str]:
    """pid's child processes (started by any of its threads: the signers are, from a thread)."""
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(x) for x in f.read().split()]
    out = {}
    for k in kids:
        with open(f"/proc/{k}/cmdline", "rb") as f:
            out[k] = f.read().replace(b"\0", b" ").decode()
    return out


def _health(zen: Zen) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{_metrics_port(zen)}/healthz", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_two_workers_serve_one_signer_signs(zen: Zen, web: Web, org: tuple[str, OrgRoot, Clients]) -> None:  # noqa: F811
    org_id, root, admin = org
    before = _metric(zen, f'keyward_zen_requests_total{{org="{org_id}",status="200"}}')
    for i in range(6):
        r = curl(zen, org_id, f"https://good.test:{web.port}/w{i}", root.crt)
        assert r.returncode == 0 and r.stdout.endswith("200") and f"/w{i}" in r.stdout, r.stderr
    kids = _children(zen.proc.pid)
    workers = [k for k, cmd in kids.items() if "data_plane.worker" in cmd]
    signers = [k for k, cmd in kids.items() if "data_plane.signer" in cmd]
    assert len(workers) == 2 and len(signers) == 1, kids  # one signer per org per ZEN, not per worker
    for w in workers:  # no worker has a signer of its own
        assert not any("data_plane.signer" in c for c in _children(w).values())
    # Every worker's requests are counted in the one /metrics.
    after = _metric(zen, f'keyward_zen_requests_total{{org="{org_id}",status="200"}}')
    assert after - before == 6
    status, report = _health(zen)
    assert status == 200 and report["workers"] == {"configured": 2, "running": 2}, report
    # A policy change at the CA reaches every worker: whichever accepts, the host is blocked now.
    admin.admin.UpdatePolicy(pb.UpdatePolicyRequest(org_id=org_id, policy=pb.Policy(
        blocked_hosts=["blocked.test", "good.test"], do_not_inspect_hosts=["dni.test"],
        blocked_url_prefixes=["good.test/private/"], proxy_credential_verifiers=[PROXY_VERIFIER])), timeout=30)
    deadline = time.monotonic() + 20
    while True:
        tries = [curl(zen, org_id, f"https://good.test:{web.port}/after", root.crt) for _ in range(4)]
        blocked = [r.returncode != 0 and "403" in r.stderr for r in tries]
        if all(blocked) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert all(blocked), [(r.returncode, r.stderr[-200:]) for r in tries]
    # A worker that dies is started again.
    os.kill(workers[0], 9)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = [k for k, cmd in _children(zen.proc.pid).items() if "data_plane.worker" in cmd]
        if len(now) == 2 and workers[0] not in now and _health(zen)[0] == 200:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the worker was not started again: {_children(zen.proc.pid)}")
