"""A CA started before its database (as pods start in any order in Kubernetes).

It listens at once, says it is alive (health ``liveness``, the liveness probe's: a restart could
not bring the database back) but not ready (``""``, Admin and KeyDistribution NOT_SERVING), keeps
trying to create its schema, and serves once three real Postgres servers come up, with no restart.
From then on every server is used: no read fails for a server that answers (CI's e2e found the
CA's per-server read pools backing off for a minute between attempts while the database was
absent, so the event hub's reads failed for that long once it was there).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.pg import PgCluster, free_port
from protos.keyward.v1 import keyward_pb2 as pb
from tests.helpers import clients, start_ca, wait_for

SERVING = health_pb2.HealthCheckResponse.SERVING


def test_ca_started_before_its_database(workdir: Path, pki_dir: Path, master_secret: tuple[bytes, Path]) -> None:
    cluster = PgCluster(workdir / f"late-{uuid.uuid4().hex[:6]}", (free_port(), free_port(), free_port()))
    hp = free_port()
    ca = start_ca(cluster, pki_dir, master_secret[1], workdir / "ca-late", wait_serving=False,
                  KEYWARD_HEALTH_LISTEN=f"127.0.0.1:{hp}")
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{hp}"))

    def status(service: str) -> int:
        return int(health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)
    try:
        wait_for(lambda: "could not ensure the schema" in ca.log_text(), 30, "the CA to find no database")
        assert status("liveness") == SERVING
        for s in ("", "keyward.v1.Admin", "keyward.v1.KeyDistribution"):
            assert status(s) != SERVING, s
        cluster.init()  # the database arrives
        wait_for(lambda: status("keyward.v1.KeyDistribution") == SERVING and status("") == SERVING, 60,
                 "the CA to create its schema and report SERVING")
        assert "schema ensured" in ca.log_text() and status("liveness") == SERVING
        # The event hub reads the log's end from the servers once a second: the next read after
        # SERVING finds it (no "database unavailable" from any read of the hub's after the schema).
        wait_for(lambda: "event hub: ready" in ca.log_text(), 10, "the event hub to read the log's end")
        after = ca.log_text().split("schema ensured", 1)[1]
        assert "database unavailable" not in after, after[-1500:]
        assert ca.proc.poll() is None  # no restart needed
        admin = clients(ca.addr, pki_dir, "platform-admin")
        org = admin.admin.CreateOrganization(pb.CreateOrganizationRequest(org_id="late", display_name="Late"),
                                             timeout=30)
        assert org.org_id == "late"
    finally:
        ca.stop()
        cluster.destroy()
