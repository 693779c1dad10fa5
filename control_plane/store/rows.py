"""What the store returns and takes: plain frozen values, and their converters from rows.

Contract: nothing here does I/O. A converter takes a row as psycopg's
``dict_row`` gives it and returns the value; the store's callers (the service,
the event hub, the CLI) see only these types, never a connection or a row.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from control_plane import authz
from control_plane.certs import KeyAlgorithm
from control_plane.policy import Policy


@dataclass(frozen=True)
class OrgRow:
    org_id: str
    display_name: str
    policy: Policy
    policy_version: int
    active_key_id: str
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True)
class PoolRow:
    name: str
    visibility: str  # "public" | "private"
    org_ids: tuple[str, ...]
    serves_fail_closed: bool = False
    """At least one org it serves is fail-closed (the operator never bypasses it)."""

    def serves(self, org_id: str, private_zen_only: bool) -> bool:
        """The rule, :func:`control_plane.authz.pool_serves`, for this pool."""
        return authz.pool_serves(self.visibility, self.org_ids, org_id, private_zen_only)


@dataclass(frozen=True)
class IntermediateRow:
    key_id: str
    org_id: str
    state: str  # pending | active | rotated | revoked | discarded
    version: int
    algorithm: KeyAlgorithm
    spki_sha256: bytes
    subject: str
    serial_hex: str
    not_before: dt.datetime | None
    not_after: dt.datetime | None
    created_at: dt.datetime
    activated_at: dt.datetime | None
    ended_at: dt.datetime | None


@dataclass(frozen=True)
class ActiveKey:
    org: OrgRow
    key_id: str
    version: int
    algorithm: KeyAlgorithm
    keylib_format: str
    spki_sha256: bytes
    sealed_key: bytes
    certificate_pem: str
    chain_pem: str
    not_after: dt.datetime

    def __repr__(self) -> str:
        return f"ActiveKey(org={self.org.org_id!r}, key_id={self.key_id!r}, version={self.version})"


@dataclass(frozen=True)
class KeyEventRow:
    seq: int
    org_id: str
    kind: str  # rotated | revoked | policy_changed | access_revoked (| genesis: the first row, never sent)
    key_id: str
    version: int
    policy_version: int
    """For policy_changed: the version the change made (the policy itself is the org's)."""
    audience: tuple[str, ...]
    """The pools it is for, fixed when it was written (:mod:`control_plane.store.events`)."""
    at: dt.datetime


@dataclass(frozen=True)
class RequestKey:
    """An admin write's idempotency key: the caller's request_id and a digest
    of the request's other fields, so a reused id with other parameters is
    refused instead of answered with another call's result."""

    id: str = ""
    params: str = ""


NO_REQUEST = RequestKey()


@dataclass(frozen=True)
class Actor:
    """Who is acting, for the audit row."""

    spiffe_id: str


def org_row(r: dict[str, Any], policy: Policy | None = None) -> OrgRow:
    """``policy``, when given, is the row's policy already parsed (its JSON is not read)."""
    return OrgRow(
        org_id=r["org_id"],
        display_name=r["display_name"],
        policy=policy if policy is not None else Policy.from_json(r["policy"]),
        policy_version=r["policy_version"],
        active_key_id=str(r["active_key_id"] or ""),
        created_at=r["created_at"],
        updated_at=r["updated_at"],
    )


def intermediate_row(r: dict[str, Any]) -> IntermediateRow:
    return IntermediateRow(
        key_id=str(r["key_id"]),
        org_id=r["org_id"],
        state=r["state"],
        version=r["version"] or 0,
        algorithm=KeyAlgorithm(r["algorithm"]),
        spki_sha256=bytes(r["spki_sha256"]),
        subject=r["subject"] or "",
        serial_hex=r["serial_hex"] or "",
        not_before=r["not_before"],
        not_after=r["not_after"],
        created_at=r["created_at"],
        activated_at=r["activated_at"],
        ended_at=r.get("ended_at"),
    )


def event_row(r: dict[str, Any]) -> KeyEventRow:
    return KeyEventRow(
        seq=r["seq"], org_id=r["org_id"], kind=r["kind"], key_id=r["key_id"], version=r["version"],
        policy_version=r["policy_version"], audience=tuple(r["audience"]), at=r["at"],
    )
