"""control_plane.auditchain: edits, insertions and deletions break the chain."""

from __future__ import annotations

import dataclasses
import datetime as dt

from control_plane.auditchain import GENESIS, AuditRecord, extend, link, verify


def _chain(n: int) -> list[tuple[AuditRecord, bytes, bytes]]:
    rows, prev = [], GENESIS
    for i in range(1, n + 1):
        r = AuditRecord(i, dt.datetime(2026, 1, 1, tzinfo=dt.UTC), "spiffe://keyward/platform-admin",
                        "CreateOrganization", f"org{i}", "", "ok", "")
        h = link(prev, r)
        rows.append((r, prev, h))
        prev = h
    return rows


def test_intact_chain() -> None:
    v = verify(_chain(5))
    assert v.ok and v.rows == 5


def test_edit_is_detected() -> None:
    rows = _chain(5)
    r, p, h = rows[2]
    rows[2] = (dataclasses.replace(r, outcome="PERMISSION_DENIED"), p, h)
    v = verify(rows)
    assert not v.ok and "row 3" in v.problem and "edited" in v.problem


def test_deletion_is_detected() -> None:
    rows = _chain(5)
    del rows[1]
    v = verify(rows)
    assert not v.ok and "deleted or inserted" in v.problem


def test_extend_chains_records_after_a_given_head() -> None:
    rows = _chain(6)
    recs = [r for r, _, _ in rows]
    assert extend(GENESIS, recs) == rows
    # From the middle: rows 4..6 hashed after row 3's hash are the same rows.
    assert extend(rows[2][2], recs[3:]) == rows[3:]
    assert verify(rows[:3] + extend(rows[2][2], recs[3:])).ok
    assert extend(GENESIS, []) == []
