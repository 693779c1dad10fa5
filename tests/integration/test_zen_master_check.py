"""A ZEN whose master secret is not the CA's: before, it started and every CONNECT of a fail-closed
org then died; now the check values are compared (keylib.kdf.master_check_value against the CA's
KeyDistribution/GetCaInfo). At start: one line, exit 2. A ZEN that could not reach the CA at
start runs on and compares at first contact: no key is opened, /healthz says why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from devstack.pg import PgCluster, free_port
from keylib.kdf import master_check_value
from keylib.master import MasterSecret
from tests.helpers import CAProcess, Clients, OrgRoot, start_ca, wait_for
from tests.integration.test_zen import ROOT, Web, _procs, curl, org, served_chain, start_zen, web  # noqa: F401


@pytest.fixture(scope="module")
def other_secret(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Path]:
    secret = os.urandom(48)
    f = tmp_path_factory.mktemp("other-secret") / "master.key"
    f.write_bytes(secret)
    f.chmod(0o600)
    return secret, f


def _kcv(secret: bytes) -> str:
    return master_check_value(MasterSecret.from_bytes(secret, require_lock=False))


def _mismatch(mine: bytes, theirs: bytes) -> str:
    return (f"KEYWARD_MASTER_SECRET_FILE does not match the CA's master secret (check value {_kcv(mine)}, the CA's "
            f"{_kcv(theirs)}): the ZEN cannot open any key; use the same secret as the CA")


def test_a_zen_with_another_master_secret_refuses_to_start(
    ca: CAProcess, platform: Clients, pki_dir: Path, master_secret: tuple[bytes, Path],
    other_secret: tuple[bytes, Path],
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARD_")}
    env.update(KEYWARD_ZEN_LISTEN="127.0.0.1:0", KEYWARD_ZEN_METRICS_LISTEN="127.0.0.1:0", KEYWARD_CA_ADDR=ca.addr,
               KEYWARD_ZEN_TLS_CERT_FILE=str(pki_dir / "zen-public.crt"),
               KEYWARD_ZEN_TLS_KEY_FILE=str(pki_dir / "zen-public.key"),
               KEYWARD_ZEN_CA_TRUST_FILE=str(pki_dir / "ca.crt"), KEYWARD_MASTER_SECRET_FILE=str(other_secret[1]))
    r = subprocess.run([sys.executable, "-m", "data_plane"], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stderr
    recs = [json.loads(ln) for ln in r.stderr.splitlines()]
    errors = [x for x in recs if x["level"] == "error"]
    assert [x["msg"] for x in errors] == [_mismatch(other_secret[0], master_secret[0])], recs
    assert "Traceback" not in r.stderr
    # The CA's start line carries its value: an operator compares the two by eye.
    assert f'"master_check": "{_kcv(master_secret[0])}"' in ca.log_text()


def test_a_zen_that_met_the_ca_late_compares_at_first_contact_and_opens_no_key(
    pg: PgCluster, ca: CAProcess, pki_dir: Path, master_secret: tuple[bytes, Path], other_secret: tuple[bytes, Path],
    web: Web, workdir: Path, org: tuple[str, OrgRoot, Clients],  # noqa: F811
) -> None:
    org_id, root, _ = org
    port = free_port()
    z = start_zen(ca, pki_dir, other_secret[1], web, workdir, extra={"KEYWARD_CA_ADDR": f"127.0.0.1:{port}"})
    late = None
    try:
        assert "could not be reached at start" in z.log.read_text()
        late = start_ca(pg, pki_dir, master_secret[1], workdir / "ca-late", KEYWARD_CA_LISTEN=f"127.0.0.1:{port}")
        want = _mismatch(other_secret[0], master_secret[0])
        wait_for(lambda: any(json.loads(ln).get("msg") == want and json.loads(ln)["level"] == "error"
                             for ln in z.log.read_text().splitlines()), 30, "the mismatch at first contact")
        # The org is fail-open: with no key opened, its traffic is tunnelled, not intercepted.
        r = curl(z, org_id, f"https://good.test:{web.port}/late", web.root_crt)
        assert r.returncode == 0 and r.stdout.endswith("200"), r.stderr
        chain = served_chain(z, org_id, "good.test", web.port)
        assert chain and chain[0].issuer.rfc4514_string() == "CN=test web root"
        mport = next(int(json.loads(ln)["port"]) for ln in z.log.read_text().splitlines()
                     if '"metrics listening"' in ln)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{mport}/healthz", timeout=10)
        assert e.value.code == 503
        report = json.loads(e.value.read())
        assert report["master_check"] == "differs from the CA's" and want in report["problems"]
        assert _procs(z.proc.pid) == [z.proc.pid]  # no signer: no key was opened
    finally:
        if late is not None:
            late.stop()
        z.proc.terminate()
        z.proc.wait(15)
    # Both logs, start to stop (the CA's shutdown included), are JSON lines with time, level, logger.
    for text in (late.log_text(), z.log.read_text()):
        for ln in text.splitlines():
            assert {"time", "level", "logger"} <= set(json.loads(ln)), ln
