"""The audit log's hash chain (pure).

Each row's hash is ``SHA-256(prev_hash || canonical(row))`` where
``canonical`` is compact, key-sorted JSON of the row's fields. The first
row's ``prev_hash`` is 32 zero bytes and ``seq`` runs 1, 2, 3... without
gaps, so an edited, inserted or deleted row breaks verification from that
row on. Rows hold who, what, org, key id, outcome and time, never key
material.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

GENESIS = bytes(32)


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    at: dt.datetime
    actor: str
    action: str
    org_id: str
    key_id: str
    outcome: str
    detail: str


def canonical(r: AuditRecord) -> bytes:
    return json.dumps(
        {
            "seq": r.seq,
            "at": r.at.astimezone(dt.UTC).isoformat(timespec="microseconds"),
            "actor": r.actor,
            "action": r.action,
            "org_id": r.org_id,
            "key_id": r.key_id,
            "outcome": r.outcome,
            "detail": r.detail,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()


def link(prev_hash: bytes, r: AuditRecord) -> bytes:
    return hashlib.sha256(prev_hash + canonical(r)).digest()


def extend(prev_hash: bytes, records: Iterable[AuditRecord]) -> list[tuple[AuditRecord, bytes, bytes]]:
    """(record, prev_hash, hash) for ``records`` appended in order after a row whose hash is
    ``prev_hash`` (:data:`GENESIS` for the first row): each hashes the one before. The caller
    numbers them (seq) consecutively after that row's."""
    out: list[tuple[AuditRecord, bytes, bytes]] = []
    prev = prev_hash
    for r in records:
        h = link(prev, r)
        out.append((r, prev, h))
        prev = h
    return out


@dataclass(frozen=True)
class Verdict:
    ok: bool
    rows: int
    head_hex: str
    problem: str = ""


def verify(rows: Iterable[tuple[AuditRecord, bytes, bytes]]) -> Verdict:
    """Check (record, prev_hash, hash) rows in seq order."""
    prev = GENESIS
    n = 0
    for rec, prev_hash, h in rows:
        n += 1
        if rec.seq != n:
            return Verdict(False, n, prev.hex(), f"row seq {rec.seq} where {n} was expected (a row was deleted or inserted)")
        if prev_hash != prev:
            return Verdict(False, n, prev.hex(), f"row {rec.seq}: prev_hash does not match row {rec.seq - 1}'s hash")
        if link(prev, rec) != h:
            return Verdict(False, n, prev.hex(), f"row {rec.seq}: content does not match its hash (edited)")
        prev = h
    return Verdict(True, n, prev.hex())
