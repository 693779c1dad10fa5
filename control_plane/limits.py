"""Per-caller limits and bounded caches (pure: no I/O, no protobuf).

One tenant must never slow or blind another, so everything a caller can make
the CA hold is counted per caller (:class:`Slots`) or bounded in bytes in
total (:class:`ByteLRU`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from control_plane.errors import ResourceExhausted

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Slots:
    """At most ``limit`` things in flight per caller (writes, streams).

    ``take`` raises ResourceExhausted naming the caller, the limit and what
    to do; ``give`` returns a slot. Callers with nothing in flight cost no
    memory, so the table is bounded by what is in flight.
    """

    def __init__(self, what: str, limit: int, advice: str) -> None:
        self.what = what
        self.limit = limit
        self.advice = advice
        self.n: dict[str, int] = {}

    def take(self, who: str) -> str:
        if self.n.get(who, 0) >= self.limit:
            raise ResourceExhausted(f"{who} already has {self.limit} {self.what} in progress; {self.advice}")
        self.n[who] = self.n.get(who, 0) + 1
        return who

    def give(self, who: str) -> None:
        if who:
            self.n[who] -= 1
            if not self.n[who]:
                del self.n[who]


class Rate:
    """At most ``per_second`` on average per caller, ``burst`` at once (token buckets); callers
    whose bucket is full again are forgotten, so the table is bounded by recent callers."""

    def __init__(self, what: str, per_second: float, burst: int) -> None:
        self.what, self.rate, self.burst = what, per_second, float(burst)
        self._b: dict[str, tuple[float, float]] = {}

    def take(self, who: str, now: float) -> None:
        tokens, then = self._b.get(who, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens < 1.0:
            raise ResourceExhausted(f"{who} may make at most {self.rate:g} {self.what} a second "
                                    f"({self.burst:g} at once); retry in {(1.0 - tokens) / self.rate:.1f}s")
        self._b[who] = (tokens - 1.0, now)
        if len(self._b) > 10000:
            self._b = {k: v for k, v in self._b.items() if v[0] + (now - v[1]) * self.rate < self.burst}


class ByteLRU(Generic[K, V]):
    """A least-recently-used cache bounded by the total ``size`` of its values, in bytes.

    A value larger than the whole budget is returned by :meth:`get` but not kept.
    """

    def __init__(self, budget_bytes: int, size: Callable[[V], int]) -> None:
        self.budget = budget_bytes
        self._size = size
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.bytes = 0

    def get(self, key: K, make: Callable[[], V]) -> V:
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
            return hit[0]
        value = make()
        n = self._size(value)
        if n <= self.budget:
            self._items[key] = (value, n)
            self.bytes += n
            while self.bytes > self.budget:
                _, (_, dropped) = self._items.popitem(last=False)
                self.bytes -= dropped
        return value

    def __len__(self) -> int:
        return len(self._items)
