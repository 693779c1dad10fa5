"""The ZEN's /healthz says whether org keys can be held safely (issue 10, finding 6).

Once, as a process without CAP_IPC_LOCK under an 8 MiB RLIMIT_MEMLOCK, the
signer had VmLck 0 kB and the ZEN started with KEYWARD_REQUIRE_MLOCK=true,
silently. Now the key is not opened, its org runs on its fail mode, and the
health report (HTTP 503 on /healthz) and the metrics say why.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import CAProcess, Clients, OrgRoot
from tests.integration.flow import activate, create_org, org_admin
from tests.integration.test_zen import Web, Zen, curl, start_zen, web  # noqa: F401 (fixture)
from tests.integration.test_zen_auth import _metric, _metrics_port


def _health(zen: Zen) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{_metrics_port(zen)}/healthz", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _no_ipc_lock_python(tmp_path: Path, memlock_kib: int) -> str:
    """This python with RLIMIT_MEMLOCK as given and no capability (root without CAP_IPC_LOCK is held
    to the limit too), as a ZEN runs in a pod admitted by PodSecurity `restricted`."""
    drop = ""
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is needed to drop capabilities")
        drop = f"{setpriv} --inh-caps=-all --bounding-set=-all "
    w = tmp_path / "python"
    w.write_text(f'#!/bin/sh\nulimit -l {memlock_kib} || exit 97\nexec {drop}{sys.executable} "$@"\n')
    w.chmod(0o755)
    return str(w)


@pytest.mark.parametrize("require", ["true", "false"])
def test_healthz_reports_key_memory_that_cannot_be_locked(
    require: str, ca: CAProcess, platform: Clients, pki_dir: Path, master_secret: tuple[bytes, Path],
    web: Web, workdir: Path, tmp_path: Path, new_org_id: str,  # noqa: F811
) -> None:
    create_org(platform, new_org_id)
    root = OrgRoot.create(tmp_path, new_org_id)
    activate(org_admin(ca.addr, pki_dir, new_org_id), root, new_org_id)
    z = start_zen(ca, pki_dir, master_secret[1], web, workdir, python=_no_ipc_lock_python(tmp_path, 64),
                  extra={"KEYWARD_REQUIRE_MLOCK": require})
    try:
        code, report = _health(z)
        assert code == 200 and report["key_memory_locked"] is None  # no key opened yet
        r = curl(z, new_org_id, f"https://good.test:{web.port}/x", root.crt)
        code, report = _health(z)
        assert report["key_memory_locked"] is False and report["status"] == "degraded"
        if require == "true":
            # Not opened: the fail-open org is tunnelled (the client sees the origin's certificate,
            # which it does not trust here), the ZEN is unhealthy and says why.
            assert r.returncode != 0
            assert code == 503 and "keys are not opened" in str(report["problems"])
            assert _metric(z, 'keyward_zen_key_fetches_total{result="not_opened"}') >= 1
            assert _metric(z, "keyward_zen_keys_held") == 0
        else:
            assert r.returncode == 0 and r.stdout.endswith("200"), r.stderr
            assert code == 200 and "could be swapped out" in str(report["problems"])
        assert _metric(z, "keyward_zen_signer_memory_locked") == 0
        assert z.proc.poll() is None  # it keeps serving (other orgs, tunnels)
    finally:
        z.proc.terminate()
        z.proc.wait(15)
