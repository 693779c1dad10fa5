"""Steady load for the fault campaign: key-custody writes through the real CA over mTLS, and
key reads by a ZEN identity, every call and its outcome kept in a ledger.

Each writer owns its orgs and runs one program per org, every write with a request_id of its
own, retried with the SAME id while its outcome is unknown (UNAVAILABLE, DEADLINE_EXCEEDED, a
dropped connection) or it was throttled: create org, CSR, upload the signed intermediate, two
policy updates, rotate (another CSR + upload), revoke; then a new org.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from devstack import pki
from protos.keyward.v1 import keyward_pb2 as pb
from tests.helpers import Clients, OrgRoot, clients
from tests.integration.flow import PROXY_VERIFIER

# Reconnect at once to a restarted CA (the default backoff grows to minutes).
CHANNEL_OPTIONS: list[tuple[str, Any]] = [("grpc.initial_reconnect_backoff_ms", 200),
                                          ("grpc.min_reconnect_backoff_ms", 200),
                                          ("grpc.max_reconnect_backoff_ms", 1000)]
ATTEMPT_TIMEOUT = 6.0
ZEN_TIMEOUT = 5.0
"""The ZEN's own deadline for GetKeyPair (data_plane.ca_client)."""
OP_BUDGET = 240.0
"""Seconds a write is retried with its request_id before the writer gives up on it (abandoned)."""
RETRY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
         grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN}


@dataclass
class Op:
    writer: int
    org: str
    action: str
    request_id: str
    started: float
    attempts: int = 0
    unknown: bool = False
    """At least one attempt ended with its outcome unknown (then retried with the same id)."""
    acked: float | None = None
    ack_attempt_started: float | None = None
    refused: str = ""
    abandoned: bool = False
    result: Any = None


@dataclass
class ClientError:
    t: float
    who: str  # writer | zen
    code: str
    detail: str
    started: float = 0.0
    """When the call began (ZEN reads)."""


@dataclass
class Ledger:
    ops: list[Op] = field(default_factory=list)
    errors: list[ClientError] = field(default_factory=list)
    reads_ok: list[float] = field(default_factory=list)
    reads_failed: list[ClientError] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def acked(self) -> list[Op]:
        with self.lock:
            return [o for o in self.ops if o.acked is not None]


class Load:
    def __init__(self, addr: str, pki_dir: Path, base: Path, key_org: str, *, writers: int = 3,
                 read_interval: float = 0.25) -> None:
        self.addr, self.pki_dir, self.base, self.key_org = addr, pki_dir, base, key_org
        self.ledger = Ledger()
        self.stop = threading.Event()
        self.paused = threading.Event()
        self.idle = [threading.Event() for _ in range(writers)]
        self.read_interval = read_interval
        self.threads = [threading.Thread(target=self._writer, args=(i,), daemon=True, name=f"writer{i}")
                        for i in range(writers)]
        self.threads.append(threading.Thread(target=self._reader, daemon=True, name="zen-reader"))

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def pause(self, timeout: float = OP_BUDGET + 30) -> None:
        """Let every writer finish its write in progress and wait (reads go on)."""
        self.paused.set()
        for ev in self.idle:
            if not ev.wait(timeout):
                raise AssertionError(f"a writer did not finish its write within {timeout}s")

    def resume(self) -> None:
        for ev in self.idle:
            ev.clear()
        self.paused.clear()

    def close(self) -> None:
        self.stop.set()
        self.paused.clear()
        for t in self.threads:
            t.join(OP_BUDGET + 10)

    # -- writes

    def _call(self, i: int, org: str, action: str, fn: Callable[..., Any], req: Any) -> Op:
        op = Op(i, org, action, str(uuid.uuid4()), time.monotonic())
        req.request_id = op.request_id
        with self.ledger.lock:
            self.ledger.ops.append(op)
        while True:
            op.attempts += 1
            t = time.monotonic()
            try:
                op.result = fn(req, timeout=ATTEMPT_TIMEOUT)
                op.acked, op.ack_attempt_started = time.monotonic(), t
                return op
            except grpc.RpcError as e:
                code, detail = e.code(), e.details() or ""
                with self.ledger.lock:
                    self.ledger.errors.append(ClientError(time.monotonic(), f"writer{i}", code.name, detail[:200]))
                if code not in RETRY:
                    op.refused = f"{code.name}: {detail[:200]}"
                    return op
                # UNAVAILABLE before the write started is a definite "not applied"; anything
                # else may have been applied: either way the same request_id is safe to resend.
                if code is not grpc.StatusCode.RESOURCE_EXHAUSTED and not (
                        code is grpc.StatusCode.UNAVAILABLE and "outcome unknown" not in detail
                        and "connect" not in detail.lower()):
                    op.unknown = True
                if time.monotonic() - op.started > OP_BUDGET or self.stop.is_set():
                    op.abandoned = True
                    return op
                time.sleep(0.2 if code is not grpc.StatusCode.RESOURCE_EXHAUSTED else 0.5)

    def _writer(self, i: int) -> None:
        root = OrgRoot.create(self.base / f"w{i}", f"w{i}")
        platform = clients(self.addr, self.pki_dir, "platform-admin", options=CHANNEL_OPTIONS)
        n = 0
        try:
            while not self.stop.is_set():
                n += 1
                org = f"ch-w{i}-{uuid.uuid4().hex[:8]}"
                pki.org_admin(self.pki_dir, org)
                admin = clients(self.addr, self.pki_dir, f"org-admin-{org}", options=CHANNEL_OPTIONS)
                try:
                    self._program(i, org, root, platform, admin)
                finally:
                    admin.chan.close()
        finally:
            self.idle[i].set()

    def _gate(self, i: int) -> bool:
        """Between two writes: wait while paused. False: stop."""
        if self.paused.is_set():
            self.idle[i].set()
            while self.paused.is_set() and not self.stop.is_set():
                time.sleep(0.05)
        return not self.stop.is_set()

    def _program(self, i: int, org: str, root: OrgRoot, platform: Clients, admin: Clients) -> None:
        def ok(op: Op) -> bool:
            return op.acked is not None

        if not self._gate(i):
            return
        policy = pb.Policy(proxy_credential_verifiers=[PROXY_VERIFIER])
        if not ok(self._call(i, org, "CreateOrganization", platform.admin.CreateOrganization,
                             pb.CreateOrganizationRequest(org_id=org, display_name=f"{org} Inc", policy=policy))):
            return
        active = ""
        for step in ("activate", "policy", "policy", "activate", "revoke"):
            if not self._gate(i):
                return
            if step == "activate":
                csr = self._call(i, org, "RequestIntermediateCsr", admin.admin.RequestIntermediateCsr,
                                 pb.RequestIntermediateCsrRequest(org_id=org, algorithm=pb.KEY_ALGORITHM_EC_P256))
                if not ok(csr) or not self._gate(i):
                    return
                up = self._call(i, org, "UploadIntermediateCertificate", admin.admin.UploadIntermediateCertificate,
                                pb.UploadIntermediateCertificateRequest(
                                    org_id=org, certificate_pem=root.sign(csr.result.csr_pem),
                                    chain_pem=root.crt.read_text()))
                if not ok(up):
                    return
                active = up.result.key_id
            elif step == "policy":
                policy = pb.Policy(proxy_credential_verifiers=[PROXY_VERIFIER],
                                   blocked_hosts=[f"b{uuid.uuid4().hex[:6]}.example"])
                if not ok(self._call(i, org, "UpdatePolicy", admin.admin.UpdatePolicy,
                                     pb.UpdatePolicyRequest(org_id=org, policy=policy))):
                    return
            else:
                if not ok(self._call(i, org, "RevokeIntermediate", admin.admin.RevokeIntermediate,
                                     pb.RevokeIntermediateRequest(org_id=org, key_id=active, reason="chaos"))):
                    return

    # -- reads

    def _reader(self) -> None:
        zen = clients(self.addr, self.pki_dir, "zen-public", options=CHANNEL_OPTIONS)
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                kp = zen.keys.GetKeyPair(pb.GetKeyPairRequest(org_id=self.key_org), timeout=ZEN_TIMEOUT)
                assert kp.encrypted_private_key
                with self.ledger.lock:
                    self.ledger.reads_ok.append(time.monotonic())
            except grpc.RpcError as e:
                with self.ledger.lock:
                    self.ledger.reads_failed.append(ClientError(time.monotonic(), "zen", e.code().name,
                                                                (e.details() or "")[:200], started=t0))
            self.stop.wait(self.read_interval)
