"""The current call's deadline, shared by the service (which sets it) and the
store (which bounds database waits by it). Pure: a context variable."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

CALL_DEADLINE: ContextVar[float | None] = ContextVar("keyward_call_deadline", default=None)


def remaining(default: float) -> float:
    """Seconds left in the current call, or ``default`` outside a call."""
    d = CALL_DEADLINE.get()
    return default if d is None else d - time.monotonic()


@contextmanager
def keep(seconds: float) -> Iterator[None]:
    """Within the block the call's deadline is ``seconds`` earlier: time kept for what follows it
    (outside a call, nothing changes)."""
    d = CALL_DEADLINE.get()
    token = CALL_DEADLINE.set(None if d is None else d - seconds)
    try:
        yield
    finally:
        CALL_DEADLINE.reset(token)
