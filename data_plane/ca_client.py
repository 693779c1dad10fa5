"""The ZEN's client of the Central Authority: the only data-plane module
that touches protobuf types. Converts to plain values (see policy.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from common.policy import DEFAULT_IDLE_SECONDS
from common.status import Outcome, classify
from data_plane.policy import OrgPolicy
from keylib.names import NameConstraints
from protos.keyward.v1 import keyward_pb2 as pb
from protos.keyward.v1 import keyward_pb2_grpc as pb_grpc


class CAError(Exception):
    """Base of the client's errors."""


class CAUnavailable(CAError):
    """Nothing was decided (the CA cannot be reached, timed out, is busy) or the CA failed
    (common.status: RETRY or BROKEN): keep using held keys, try again."""


class CARefused(CAError):
    """The CA answered no (common.status REFUSED): it will again until someone changes something."""


class KeyRefused(CARefused):
    """The CA will not send this org's key to this pool (or the org is unknown)."""


class NoActiveKey(CARefused):
    """The org has no active intermediate."""


def _error(e: grpc.aio.AioRpcError) -> CAError:
    """The client's error for a failed call (common.status.classify decides which kind)."""
    code = e.code()
    what = f"{code.name}: {e.details()}"
    if classify(code.name) is not Outcome.REFUSED:
        return CAUnavailable(what)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return KeyRefused(e.details() or "refused")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return NoActiveKey(e.details() or "no active key")
    return CARefused(what)


@dataclass(frozen=True)
class KeyMaterial:
    org_id: str
    key_id: str
    version: int
    keylib_format: str
    sealed: bytes
    certificate_pem: str
    chain_pem: str
    policy: OrgPolicy

    def __repr__(self) -> str:
        return f"KeyMaterial(org_id={self.org_id!r}, key_id={self.key_id!r}, version={self.version})"


@dataclass(frozen=True)
class Event:
    seq: int
    kind: str  # rotated | revoked | policy | access_revoked
    org_id: str
    key_id: str
    version: int
    policy: OrgPolicy | None


_KINDS = {pb.KEY_EVENT_KIND_ROTATED: "rotated", pb.KEY_EVENT_KIND_REVOKED: "revoked",
          pb.KEY_EVENT_KIND_POLICY_CHANGED: "policy", pb.KEY_EVENT_KIND_ACCESS_REVOKED: "access_revoked"}


def policy_from_pb(org_id: str, p: pb.Policy, version: int) -> OrgPolicy:
    return OrgPolicy(org_id=org_id, fail_closed=p.fail_mode == pb.FAIL_MODE_CLOSED,
                     idle_seconds=p.key_idle_timeout_seconds or DEFAULT_IDLE_SECONDS, location_cidrs=tuple(p.location_cidrs),
                     blocked_hosts=tuple(p.blocked_hosts), blocked_url_prefixes=tuple(p.blocked_url_prefixes),
                     do_not_inspect_hosts=tuple(p.do_not_inspect_hosts), version=version,
                     proxy_verifiers=tuple(p.proxy_credential_verifiers),
                     constraints=NameConstraints(tuple(p.permitted_dns_subtrees), tuple(p.excluded_dns_subtrees))
                     if p.permitted_dns_subtrees or p.excluded_dns_subtrees else None)


class CAClient:
    def __init__(self, addr: str, *, trust_pem: bytes, cert_pem: bytes, key_pem: bytes) -> None:
        creds = grpc.ssl_channel_credentials(root_certificates=trust_pem, private_key=key_pem,
                                             certificate_chain=cert_pem)
        self._chan = grpc.aio.secure_channel(addr, creds, options=[("grpc.keepalive_time_ms", 30_000)])
        self._stub = pb_grpc.KeyDistributionStub(self._chan)  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        await self._chan.close(None)

    async def get_key_pair(self, org_id: str, min_version: int = 0, timeout: float = 5.0) -> KeyMaterial:
        try:
            kp = await self._stub.GetKeyPair(pb.GetKeyPairRequest(org_id=org_id, min_version=min_version),
                                             timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise _error(e) from None
        return KeyMaterial(kp.org_id, kp.key_id, kp.version, kp.keylib_format, kp.encrypted_private_key,
                           kp.certificate_pem, kp.chain_pem, policy_from_pb(kp.org_id, kp.policy, kp.policy_version))

    async def master_check(self, timeout: float = 5.0) -> str | None:
        """The CA's master secret check value; None from a CA too old to report it."""
        try:
            info = await self._stub.GetCaInfo(pb.GetCaInfoRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None
            raise _error(e) from None
        return str(info.master_check) or None

    async def watch(self, after_seq: int, snapshot: bool) -> AsyncIterator[Event]:
        call = self._stub.WatchKeys(pb.WatchKeysRequest(after_seq=after_seq, snapshot=snapshot))
        try:
            async for ev in call:
                yield Event(ev.seq, _KINDS.get(ev.kind, "unknown"), ev.org_id, ev.key_id, ev.version,
                            policy_from_pb(ev.org_id, ev.policy, ev.policy_version) if ev.HasField("policy") else None)
        except grpc.aio.AioRpcError as e:
            raise _error(e) from None
