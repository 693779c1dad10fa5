"""control_plane.service: pure helpers of the call wrapper."""

from __future__ import annotations


def test_refusal_audit_budget_counts_what_it_skips() -> None:
    from control_plane.service import _RefusalBudget

    b = _RefusalBudget()
    b.RATE = 0.0  # no refill: exactly BURST audits, then counting
    taken = [b.take() for _ in range(int(b.BURST) + 5)]
    assert taken[: int(b.BURST)] == [0] * int(b.BURST) and taken[int(b.BURST):] == [None] * 5
    b.tokens = 1
    assert b.take() == 5  # the next audited refusal carries the count
