"""Protobuf conversions of the CA: rows and policies to messages, messages to plain values.

Pure: no I/O, no call state. With :mod:`control_plane.calls` (the call wrapper) and
:mod:`control_plane.service` (the handlers) one of the three modules of the CA's API that
touch protobuf (an import-linter contract names them).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from control_plane import certs
from control_plane.auditchain import AuditRecord
from control_plane.errors import InvalidArgument
from control_plane.limits import ByteLRU
from control_plane.policy import FailMode, Policy, validate
from control_plane.store import NO_REQUEST, ActiveKey, IntermediateRow, KeyEventRow, OrgRow, PoolRow, RequestKey
from protos.keyward.v1 import keyward_pb2 as pb

_ALG_TO_PB = {
    certs.KeyAlgorithm.RSA_2048: pb.KEY_ALGORITHM_RSA_2048,
    certs.KeyAlgorithm.RSA_3072: pb.KEY_ALGORITHM_RSA_3072,
    certs.KeyAlgorithm.RSA_4096: pb.KEY_ALGORITHM_RSA_4096,
    certs.KeyAlgorithm.EC_P256: pb.KEY_ALGORITHM_EC_P256,
    certs.KeyAlgorithm.EC_P384: pb.KEY_ALGORITHM_EC_P384,
}
_PB_TO_ALG = {v: k for k, v in _ALG_TO_PB.items()}
_PB_TO_ALG[pb.KEY_ALGORITHM_UNSPECIFIED] = certs.KeyAlgorithm.RSA_2048

_STATE_TO_PB = {
    "pending": pb.INTERMEDIATE_STATE_PENDING,
    "active": pb.INTERMEDIATE_STATE_ACTIVE,
    "rotated": pb.INTERMEDIATE_STATE_ROTATED,
    "revoked": pb.INTERMEDIATE_STATE_REVOKED,
    "discarded": pb.INTERMEDIATE_STATE_DISCARDED,
}
_EVENT_TO_PB = {
    "rotated": pb.KEY_EVENT_KIND_ROTATED,
    "revoked": pb.KEY_EVENT_KIND_REVOKED,
    "policy_changed": pb.KEY_EVENT_KIND_POLICY_CHANGED,
    "access_revoked": pb.KEY_EVENT_KIND_ACCESS_REVOKED,
}


def ts(t: dt.datetime | None) -> Timestamp | None:
    if t is None:
        return None
    out = Timestamp()
    out.FromDatetime(t)
    return out


def algorithm_from_pb(a: int) -> certs.KeyAlgorithm:
    if a not in _PB_TO_ALG:
        raise InvalidArgument(f"algorithm {a} is unknown; use RSA_2048/3072/4096 or EC_P256/P384")
    return _PB_TO_ALG[a]  # type: ignore[index]


def algorithm_to_pb(a: certs.KeyAlgorithm) -> pb.KeyAlgorithm:
    return _ALG_TO_PB[a]


# ------------------------------------------------------------------ policy

def policy_from_pb(p: pb.Policy) -> Policy:
    return validate(**policy_args(p))


def policy_args(p: pb.Policy) -> dict[str, Any]:
    """The arguments of ``policy.validate`` (plain values, for the validator process)."""
    if p.fail_mode not in (pb.FAIL_MODE_UNSPECIFIED, pb.FAIL_MODE_OPEN, pb.FAIL_MODE_CLOSED):
        raise InvalidArgument(f"policy.fail_mode {p.fail_mode} is unknown (use FAIL_MODE_OPEN or FAIL_MODE_CLOSED)")
    return dict(
        private_zen_only=p.private_zen_only,
        fail_mode=FailMode.CLOSED if p.fail_mode == pb.FAIL_MODE_CLOSED else FailMode.OPEN,
        key_idle_timeout_seconds=p.key_idle_timeout_seconds,
        location_cidrs=list(p.location_cidrs),
        blocked_hosts=list(p.blocked_hosts),
        blocked_url_prefixes=list(p.blocked_url_prefixes),
        do_not_inspect_hosts=list(p.do_not_inspect_hosts),
        proxy_credential_verifiers=list(p.proxy_credential_verifiers),
        permitted_dns_subtrees=list(p.permitted_dns_subtrees),
        excluded_dns_subtrees=list(p.excluded_dns_subtrees),
    )


def policy_to_pb(p: Policy) -> pb.Policy:
    return pb.Policy(
        private_zen_only=p.private_zen_only,
        fail_mode=pb.FAIL_MODE_CLOSED if p.fail_mode is FailMode.CLOSED else pb.FAIL_MODE_OPEN,
        key_idle_timeout_seconds=p.key_idle_timeout_seconds,
        location_cidrs=list(p.location_cidrs),
        blocked_hosts=list(p.blocked_hosts),
        blocked_url_prefixes=list(p.blocked_url_prefixes),
        do_not_inspect_hosts=list(p.do_not_inspect_hosts),
        proxy_credential_verifiers=list(p.proxy_credential_verifiers),
        permitted_dns_subtrees=list(p.permitted_dns_subtrees),
        excluded_dns_subtrees=list(p.excluded_dns_subtrees),
    )


class PolicyCache:
    """Policies as messages, per (org, version), within 16 MiB: a replay to many ZENs converts
    each policy once, and what the CA holds for it does not grow with the number of streams."""

    BUDGET = 16 << 20

    def __init__(self) -> None:
        self._lru: ByteLRU[tuple[str, int], pb.Policy] = ByteLRU(self.BUDGET, lambda m: m.ByteSize())

    def get(self, org: OrgRow) -> pb.Policy:
        return self._lru.get((org.org_id, org.policy_version), lambda: policy_to_pb(org.policy))


# -------------------------------------------------------------------- rows

def org_to_pb(o: OrgRow) -> pb.Organization:
    return pb.Organization(org_id=o.org_id, display_name=o.display_name, policy=policy_to_pb(o.policy),
                           policy_version=o.policy_version, active_key_id=o.active_key_id,
                           created_at=ts(o.created_at), updated_at=ts(o.updated_at))


def pool_to_pb(p: PoolRow) -> pb.ZenPool:
    return pb.ZenPool(name=p.name, org_ids=list(p.org_ids), serves_fail_closed_org=p.serves_fail_closed,
                      visibility=pb.POOL_VISIBILITY_PUBLIC if p.visibility == "public" else pb.POOL_VISIBILITY_PRIVATE)


def inter_to_pb(r: IntermediateRow) -> pb.Intermediate:
    return pb.Intermediate(
        key_id=r.key_id, org_id=r.org_id, state=_STATE_TO_PB[r.state], version=r.version,
        algorithm=_ALG_TO_PB[r.algorithm], public_key_sha256=r.spki_sha256.hex(), subject=r.subject,
        serial_hex=r.serial_hex, not_before=ts(r.not_before), not_after=ts(r.not_after),
        created_at=ts(r.created_at), activated_at=ts(r.activated_at), ended_at=ts(r.ended_at))


def event_to_pb(e: KeyEventRow) -> pb.KeyEvent:
    """The event without a policy (WatchKeys adds the org's policy to policy_changed events)."""
    return pb.KeyEvent(seq=e.seq, kind=_EVENT_TO_PB[e.kind], org_id=e.org_id, key_id=e.key_id,
                       version=e.version, policy_version=e.policy_version, at=ts(e.at))


def snapshot_to_pb(o: OrgRow, policy: pb.Policy) -> pb.KeyEvent:
    """An org as WatchKeys' snapshot sends it: a policy_changed event with seq 0."""
    return pb.KeyEvent(seq=0, kind=pb.KEY_EVENT_KIND_POLICY_CHANGED, org_id=o.org_id, key_id=o.active_key_id,
                       policy=policy, policy_version=o.policy_version, at=ts(o.updated_at))


def key_pair_to_pb(k: ActiveKey, o: OrgRow, policy: pb.Policy) -> pb.KeyPair:
    return pb.KeyPair(
        org_id=o.org_id, key_id=k.key_id, version=k.version, algorithm=_ALG_TO_PB[k.algorithm],
        encrypted_private_key=k.sealed_key, keylib_format=k.keylib_format,
        public_key_sha256=k.spki_sha256.hex(), certificate_pem=k.certificate_pem,
        chain_pem=k.chain_pem, not_after=ts(k.not_after), policy=policy, policy_version=o.policy_version)


def audit_to_pb(r: AuditRecord, hash_: bytes) -> pb.AuditEvent:
    return pb.AuditEvent(seq=r.seq, at=ts(r.at), actor=r.actor, action=r.action, org_id=r.org_id,
                         key_id=r.key_id, outcome=r.outcome, detail=r.detail, hash_hex=hash_.hex())


# ---------------------------------------------------------------- requests

def request_key(request: Any) -> RequestKey:
    """The idempotency key of a write: its request_id, and a digest of the rest of the request
    (a retry must send the same request; another one under the same id is refused)."""
    v = request.request_id
    if len(v) > 128 or any(not (c.isascii() and (c.isalnum() or c in "-_.:")) for c in v):
        raise InvalidArgument("request_id must be at most 128 characters of letters, digits and -_.: (a UUID is ideal)")
    if not v:
        return NO_REQUEST
    rest = type(request)()
    rest.CopyFrom(request)
    rest.request_id = ""
    return RequestKey(v, hashlib.sha256(rest.SerializeToString(deterministic=True)).hexdigest()[:32])
