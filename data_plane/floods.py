"""Budgets for HTTP/2 frames that cost the ZEN work but carry no request (pure).

A peer may send PING, SETTINGS, PRIORITY, RST_STREAM and empty DATA frames at will; each makes
the ZEN answer or bookkeep (CVE-2019-9512 ping flood, -9515 settings flood, -9518 empty
frames, CVE-2023-44487 rapid reset: streams opened and reset at once, each starting work
toward the origin). Each kind has a token bucket per connection: ``burst`` at once, refilled
at ``per_second``; a connection past a budget is ended with GOAWAY ENHANCE_YOUR_CALM. The
budgets are far above what browsers, curl, nghttp and gRPC send (a few of each per
connection, resets when a user navigates away), so only floods meet them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    burst: int
    """Frames accepted at once."""
    per_second: float
    """Refill rate, frames per second."""


BUDGETS: dict[str, Budget] = {
    "ping": Budget(100, 10.0),
    "settings": Budget(100, 10.0),
    "priority": Budget(1000, 100.0),
    "reset": Budget(400, 50.0),
    "empty_data": Budget(400, 50.0),
}


class FloodGuard:
    """One connection's budgets. ``spend(kind)`` is False once ``kind`` is over its budget."""

    def __init__(self, budgets: dict[str, Budget] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._budgets = budgets or BUDGETS
        self._clock = clock
        now = clock()
        self._state = {k: (float(b.burst), now) for k, b in self._budgets.items()}

    def spend(self, kind: str) -> bool:
        b = self._budgets[kind]
        tokens, at = self._state[kind]
        now = self._clock()
        tokens = min(float(b.burst), tokens + (now - at) * b.per_second)
        if tokens < 1.0:
            self._state[kind] = (tokens, now)
            return False
        self._state[kind] = (tokens - 1.0, now)
        return True
