"""Every line a real CA and a real ZEN write is JSON with time, level and logger (gRPC's own
lines included), and a client refused at the TLS handshake is one line naming the peer and why.

What such a client sees: gRPC cannot answer with a status before the handshake, and with TLS 1.3
the client's handshake is done before the server checks its certificate, so grpcurl without
-cert reports "write: broken pipe" (its first write after the server hung up). The CA's log says
who and why."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from devstack.pg import free_port
from tests.helpers import CAProcess, Clients, OrgRoot, wait_for
from tests.integration.test_zen import Web, curl, org, start_zen, web  # noqa: F401 (fixtures)


def _grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or "grpcurl"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


def assert_json_lines(text: str, what: str) -> list[dict[str, object]]:
    recs = []
    for ln in text.splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:
            raise AssertionError(f"{what}: not a JSON line: {ln!r}") from None
        assert isinstance(rec, dict) and {"time", "level", "logger"} <= set(rec), f"{what}: {ln!r}"
        recs.append(rec)
    return recs


def test_a_client_without_a_certificate_is_logged_with_its_peer_and_the_reason(ca: CAProcess, pki_dir: Path) -> None:
    r = _grpcurl("-cacert", str(pki_dir / "ca.crt"), ca.addr, "list")
    assert r.returncode != 0 and "Failed to dial target host" in r.stderr, r.stdout + r.stderr

    def refused() -> list[dict[str, object]]:
        return [x for x in assert_json_lines(ca.log_text(), "CA log")
                if x.get("reason") == "client presented no certificate"]
    lines = wait_for(refused, 10, "the refusal in the CA's log")
    assert lines[0]["msg"] == "TLS handshake refused" and lines[0]["logger"] == "grpc"
    assert str(lines[0]["peer"]).startswith("127.0.0.1:"), lines[0]
    # An expired certificate: refused at the handshake too, with gRPC's reason.
    _grpcurl("-cacert", str(pki_dir / "ca.crt"), "-cert", str(pki_dir / "bad-expired.crt"),
             "-key", str(pki_dir / "bad-expired.key"), ca.addr, "list")
    wait_for(lambda: [x for x in assert_json_lines(ca.log_text(), "CA log")
                      if x.get("reason") == "client certificate not accepted: certificate has expired"],
             10, "the expired certificate in the CA's log")


def test_the_ca_reports_its_master_check_value(ca: CAProcess, master_secret: tuple[bytes, Path]) -> None:
    from keylib.kdf import master_check_value
    from keylib.master import MasterSecret

    mine = master_check_value(MasterSecret.from_bytes(master_secret[0], require_lock=False))
    [listening] = [x for x in assert_json_lines(ca.log_text(), "CA log") if x.get("msg") == "CA listening"]
    assert listening["master_check"] == mine
    assert listening["event_loop"] == "uvloop"  # KEYWARD_CA_EVENT_LOOP's default, as it runs



def test_every_zen_line_is_json_and_each_502_says_why(
    ca: CAProcess, pki_dir: Path, master_secret: tuple[bytes, Path], web: Web, workdir: Path,  # noqa: F811
    org: tuple[str, OrgRoot, Clients],  # noqa: F811
) -> None:
    org_id, root, _ = org
    z = start_zen(ca, pki_dir, master_secret[1], web, workdir)
    try:
        assert curl(z, org_id, f"https://good.test:{web.port}/ok", root.crt).stdout.endswith("200")
        r = curl(z, org_id, f"https://bad.test:{web.bad_port}/", root.crt)
        assert r.stdout.endswith("502"), r.stdout + r.stderr  # the page, over TLS
        closed = free_port()
        r = curl(z, org_id, f"https://good.test:{closed}/", root.crt)
        assert r.returncode != 0 and "502" in r.stderr, r.stderr  # the page, before the tunnel

        def failed() -> list[dict[str, object]]:
            return [x for x in assert_json_lines(z.log.read_text(), "ZEN log") if x.get("status") == 502]
        lines = wait_for(lambda: len(failed()) >= 2 and failed(), 10, "both 502s in the ZEN's access log")
        untrusted = next(x for x in lines if x["connect"] == "bad.test")
        assert "is not trusted" in str(untrusted["reason"]) and untrusted["org"] == org_id
        unreachable = next(x for x in lines if x["connect"] == f"good.test:{closed}")
        assert str(unreachable["reason"]).startswith("cannot reach good.test")
        assert all(x["logger"] == "keyward.zen.access" for x in lines)
    finally:
        z.proc.terminate()
        z.proc.wait(15)
    recs = assert_json_lines(z.log.read_text(), "ZEN log")  # start to stop, signers' lines included
    assert any(x.get("msg") == "ZEN listening" and x.get("master_check") for x in recs)


def test_every_line_of_the_ca_log_is_json(ca: CAProcess) -> None:
    """Last in this module: the session CA's whole log so far (every test of the session that ran before)."""
    recs = assert_json_lines(ca.log_text(), "CA log")
    assert any(x["logger"] == "grpc" for x in recs) and any(x["logger"] == "keyward.ca" for x in recs)
