"""Shared test machinery: a real CA subprocess, mTLS clients, openssl signing.

Nothing here is a mock: the CA is `python -m control_plane serve` on port 0,
talking to a real Postgres; clients use real TLS with dev PKI identities.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from devstack import pki
from devstack.pg import PgCluster, free_port
from devstack.stack import ca_env
from protos.keyward.v1 import keyward_pb2 as pb
from protos.keyward.v1 import keyward_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent


def wait_for(pred: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``pred`` until truthy; fail after ``timeout`` seconds (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class CAProcess:
    proc: subprocess.Popen[bytes]
    log: Path
    port: int
    metrics_port: int
    env: dict[str, str]

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_ca(pg: PgCluster, pki_dir: Path, master_file: Path, workdir: Path, *, wait_serving: bool = True,
             **overrides: str) -> CAProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"ca-{time.monotonic_ns()}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARD_")}
    env.update(ca_env(pg, pki_dir, master_file, "127.0.0.1:0", "127.0.0.1:0"))
    env["KEYWARD_AUDIT_SPOOL_FILE"] = str(workdir / f"audit-spool-{time.monotonic_ns()}.jsonl")
    env.update(overrides)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "control_plane", "serve"], env=env, cwd=ROOT,
                                stdout=out, stderr=out)

    def ports() -> tuple[int, int] | None:
        if proc.poll() is not None:
            raise AssertionError(f"CA exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        p = m = 0
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("msg") == "CA listening":
                p = rec["port"]
            if rec.get("msg") == "metrics listening":
                m = rec["port"]
            if p and (not wait_serving or rec.get("msg") == "health: SERVING"):
                return p, m
        return None

    p, m = wait_for(ports, 60, "the CA to listen and report SERVING")
    return CAProcess(proc, log, p, m, env)


def start_ca_with_public_pool(pg: PgCluster, pki_dir: Path, master_file: Path, workdir: Path) -> CAProcess:
    """A CA of its own (for tests with a cluster of their own) with the dev pool 'public' registered."""
    ca = start_ca(pg, pki_dir, master_file, workdir)
    clients(ca.addr, pki_dir, "platform-admin").admin.RegisterZenPool(pb.RegisterZenPoolRequest(
        pool=pb.ZenPool(name="public", visibility=pb.POOL_VISIBILITY_PUBLIC)), timeout=30)
    return ca


def channel(addr: str, pki_dir: Path, who: str | None, *, options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(pki_dir / "ca.crt").read_bytes(),
        private_key=(pki_dir / f"{who}.key").read_bytes() if who else None,
        certificate_chain=(pki_dir / f"{who}.crt").read_bytes() if who else None,
    )
    return grpc.secure_channel(addr, creds, options=options or [])


@dataclass
class Clients:
    admin: pb_grpc.AdminStub
    keys: pb_grpc.KeyDistributionStub
    chan: grpc.Channel


def clients(addr: str, pki_dir: Path, who: str | None, **kw: Any) -> Clients:
    ch = channel(addr, pki_dir, who, **kw)
    return Clients(pb_grpc.AdminStub(ch), pb_grpc.KeyDistributionStub(ch), ch)


def code_of(fn: Any, *args: Any, **kw: Any) -> tuple[grpc.StatusCode, str]:
    """Call and return (status code, details) of the expected failure."""
    kw.setdefault("timeout", 30)
    try:
        fn(*args, **kw)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    raise AssertionError("call succeeded but a failure was expected")


@dataclass
class OrgRoot:
    """An org's own root CA, made and used with the openssl command line."""

    dir: Path
    name: str

    @property
    def crt(self) -> Path:
        return self.dir / "root.crt"

    @property
    def key(self) -> Path:
        return self.dir / "root.key"

    @classmethod
    def create(cls, base: Path, name: str) -> OrgRoot:
        d = base / f"root-{name}"
        d.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(d / "root.key"), "-out", str(d / "root.crt"), "-days", "3650",
             "-subj", f"/CN={name} root CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            check=True, capture_output=True, timeout=60)
        return cls(d, name)

    def sign(self, csr_pem: str, *, ext: str = "basicConstraints=critical,CA:TRUE,pathlen:0\n"
             "keyUsage=critical,keyCertSign,cRLSign,digitalSignature\n", days: int = 365,
             extra_args: list[str] | None = None) -> str:
        """Sign a CSR as the org's root would (openssl x509 -req)."""
        with tempfile.TemporaryDirectory() as t:
            (Path(t) / "req.csr").write_text(csr_pem)
            (Path(t) / "ext.cnf").write_text(ext)
            cmd = ["openssl", "x509", "-req", "-in", f"{t}/req.csr", "-CA", str(self.crt), "-CAkey", str(self.key),
                   "-CAcreateserial", "-out", f"{t}/out.crt", "-days", str(days), "-sha256",
                   "-extfile", f"{t}/ext.cnf"]
            cmd += list(extra_args or [])
            subprocess.run(cmd, check=True, capture_output=True, timeout=60, cwd=t)
            return (Path(t) / "out.crt").read_text()


def bad_identities(pki_dir: Path) -> None:
    """Client certificates signed by the trusted CA but breaking one rule each."""
    ca, ca_key = pki._load(pki_dir)
    now = dt.datetime.now(dt.UTC)
    cases: dict[str, dict[str, Any]] = {
        "bad-no-san": {},
        "bad-two-sans": {"uris": ["spiffe://keyward/platform-admin", "spiffe://keyward/zen-pool/public"]},
        "bad-ca-flag": {"uris": ["spiffe://keyward/platform-admin"], "is_ca": True},
        "bad-foreign-domain": {"uris": ["spiffe://evil.example/platform-admin"]},
        "bad-expired": {"uris": ["spiffe://keyward/platform-admin"], "not_before": now - dt.timedelta(days=10),
                        "not_after": now - dt.timedelta(days=1)},
        "bad-unknown-role": {"uris": ["spiffe://keyward/root"]},
    }
    for stem, kw in cases.items():
        cert, key = pki.build_cert(subject_cn=stem, issuer=ca, issuer_key=ca_key, **kw)
        pki.write_identity(pki_dir, stem, cert, key)


def table_snapshot(pg: PgCluster, exclude: tuple[str, ...] = ("audit_events",)) -> dict[str, str]:
    tables = pg.psql("SELECT tablename FROM pg_tables WHERE schemaname='public' ORDER BY 1").split()
    return {t: pg.psql(f"SELECT coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '') FROM {t} t")
            for t in tables if t not in exclude}


def pb_policy(**kw: Any) -> pb.Policy:
    return pb.Policy(**kw)


def stopped_at_failpoint(pid: int) -> bool:
    """The process is stopped (state T): it reached an armed failpoint (common.failpoints)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1].startswith("T")
    except (OSError, IndexError):
        return False


def three_servers(root: Path) -> Iterator[PgCluster]:
    """A fresh primary and two synchronous hot standbys under ``root``, destroyed afterwards
    (the body of the cluster fixtures)."""
    cluster = PgCluster(root, (free_port(), free_port(), free_port()))
    cluster.init()
    yield cluster
    cluster.destroy()
