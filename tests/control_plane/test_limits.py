"""control_plane.limits: per-caller slots and the byte-bounded cache."""

from __future__ import annotations

import pytest

from control_plane.errors import ResourceExhausted
from control_plane.limits import ByteLRU, Slots


def test_slots_are_per_caller_and_freed_callers_cost_nothing() -> None:
    s = Slots("WatchKeys streams", 3, "each ZEN needs one")
    for _ in range(3):
        s.take("a")
    with pytest.raises(ResourceExhausted, match="a already has 3 WatchKeys streams in progress; each ZEN needs one"):
        s.take("a")
    s.take("b")
    for _ in range(3):
        s.give("a")
    s.give("b")
    assert s.n == {}


def test_byte_lru_stays_within_its_budget_and_keeps_the_recent() -> None:
    made: list[str] = []

    def make(k: str, n: int) -> bytes:
        made.append(k)
        return b"x" * n

    c: ByteLRU[str, bytes] = ByteLRU(100, len)
    for k in "abcd":
        c.get(k, lambda k=k: make(k, 30))  # type: ignore[misc]
    assert c.bytes == 90 and len(c) == 3  # "a" was dropped for "d"
    c.get("b", lambda: make("b", 30))  # a hit: not made again, now the most recent
    c.get("e", lambda: make("e", 30))  # drops "c", the least recent
    assert made == ["a", "b", "c", "d", "e"]
    c.get("b", lambda: make("b", 30))
    c.get("c", lambda: make("c", 30))
    assert made[-1] == "c" and c.bytes <= 100
    big = c.get("big", lambda: make("big", 500))
    assert len(big) == 500 and c.bytes <= 100  # returned, not kept


def test_rate_allows_a_burst_then_the_rate_per_caller() -> None:
    from control_plane.limits import Rate

    r = Rate("Admin writes", 5.0, 3)
    for _ in range(3):
        r.take("a", 100.0)
    with pytest.raises(ResourceExhausted, match=r"a may make at most 5 Admin writes a second \(3 at once\); retry in 0.2s"):
        r.take("a", 100.0)
    r.take("b", 100.0)  # another caller has its own bucket
    r.take("a", 100.2)  # 0.2 s later: one more
    with pytest.raises(ResourceExhausted):
        r.take("a", 100.2)
