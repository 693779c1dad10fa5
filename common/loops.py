"""Running a program's main coroutine on the event loop its configuration names.

``uvloop`` (libuv, its transports and TLS layer in Cython) or ``asyncio`` (the standard loop); the
setting is read by ``common.env.event_loop`` (KEYWARD_CA_EVENT_LOOP, KEYWARD_ZEN_EVENT_LOOP). What
each saves is measured in bench/ (bench/README.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], loop: str) -> T:
    """``asyncio.run(main)`` on a new loop of kind ``loop`` (one of ``common.env.EVENT_LOOPS``)."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
