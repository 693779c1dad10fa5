"""data_plane.floods: token buckets per frame kind, on an injected clock."""

from __future__ import annotations

import pytest

from data_plane.floods import BUDGETS, Budget, FloodGuard


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_is_accepted_then_refused() -> None:
    clock = Clock()
    g = FloodGuard({"ping": Budget(5, 1.0)}, clock=clock)
    assert [g.spend("ping") for _ in range(5)] == [True] * 5
    assert not g.spend("ping")
    assert not g.spend("ping")  # refusing costs nothing but does not refill either


def test_the_default_budgets_allow_exactly_their_burst_at_once() -> None:
    clock = Clock()
    g = FloodGuard(clock=clock)
    for kind, b in BUDGETS.items():
        assert all(g.spend(kind) for _ in range(b.burst)), kind
        assert not g.spend(kind), kind


def test_budgets_refill_over_time_up_to_the_burst() -> None:
    clock = Clock()
    g = FloodGuard({"reset": Budget(4, 2.0)}, clock=clock)
    assert all(g.spend("reset") for _ in range(4))
    assert not g.spend("reset")
    clock.now += 0.4  # 0.8 of a token
    assert not g.spend("reset")
    clock.now += 0.1  # 1.0
    assert g.spend("reset")
    assert not g.spend("reset")
    clock.now += 1.5  # 3 tokens
    assert [g.spend("reset") for _ in range(4)] == [True, True, True, False]
    clock.now += 3600  # a long quiet spell still gives no more than the burst
    assert [g.spend("reset") for _ in range(5)] == [True] * 4 + [False]


def test_kinds_are_independent() -> None:
    clock = Clock()
    g = FloodGuard({"ping": Budget(2, 1.0), "settings": Budget(3, 1.0)}, clock=clock)
    assert g.spend("ping") and g.spend("ping") and not g.spend("ping")
    assert [g.spend("settings") for _ in range(4)] == [True, True, True, False]
    clock.now += 1.0
    assert g.spend("ping") and not g.spend("ping")
    assert g.spend("settings") and not g.spend("settings")


def test_guards_are_per_connection() -> None:
    clock = Clock()
    a, b = FloodGuard({"ping": Budget(1, 1.0)}, clock=clock), FloodGuard({"ping": Budget(1, 1.0)}, clock=clock)
    assert a.spend("ping") and not a.spend("ping")
    assert b.spend("ping")


def test_an_unknown_kind_is_a_programming_error() -> None:
    with pytest.raises(KeyError):
        FloodGuard(clock=Clock()).spend("headers")
