"""Leader election's decision (k8s/operator/leader.py), as a table: client-go's rules."""

from __future__ import annotations

from typing import Any

from k8s.operator.leader import Observed, Timing, decide, record

T = Timing(lease_seconds=15)


def lease(holder: str, renew: str = "t1", transitions: int = 0) -> dict[str, Any]:
    return {"spec": {"holderIdentity": holder, "renewTime": renew, "leaseTransitions": transitions}}


def test_decisions() -> None:
    assert decide(None, "a", None, 0, T) == "create"
    assert decide(lease("a"), "a", None, 0, T) == "renew"
    assert decide(lease(""), "a", None, 0, T) == "acquire"  # released by its holder
    # Another holder: never taken on a first look, nor while its renewals move.
    assert decide(lease("b"), "a", None, 100, T) == "wait"
    seen = Observed(record(lease("b", "t1")), at=100)
    assert decide(lease("b", "t2"), "a", seen, 200, T) == "wait"
    # Unchanged for a whole lease duration on *our* clock (skew between nodes cannot matter).
    assert decide(lease("b", "t1"), "a", seen, 114.9, T) == "wait"
    assert decide(lease("b", "t1"), "a", seen, 115, T) == "acquire"
