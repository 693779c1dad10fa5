"""After a key is retired, its bytes leave every server's pg_wal: in the background.

A deleted row's bytes stay in the WAL that carried it (its INSERT, full-page
images) until a checkpoint removes the segment, and a standby removes WAL only
at its own restartpoint: a CHECKPOINT on the primary does not clear it.
:class:`WalPurger` runs the store's clean-up (:meth:`Store.forget_retired_wal`:
checkpoint the primary, then each standby once it has replayed that far) after
every retirement:

* never in the RPC's path: :meth:`WalPurger.notify` only sets an event;
* debounced: retirements within :attr:`WalPurger.debounce` seconds share a run,
  and one during a run causes one more run after it;
* bounded: each attempt has a deadline; a failed or partial attempt (a standby
  unreachable, lagging) is a JSON warning and is retried after each of
  :attr:`WalPurger.retry_delays`, then left to the backup agent and the
  servers' own checkpoints. It never fails a call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("keyward.ca.walpurge")

Purge = Callable[[float], Awaitable[list[str]]]
"""The clean-up: takes a time budget in seconds, returns the problems it met (empty: done)."""


class WalPurger:
    def __init__(self, purge: Purge, *, debounce: float = 0.5, timeout: float = 90.0,
                 retry_delays: tuple[float, ...] = (5.0, 30.0)) -> None:
        self._purge = purge
        self.debounce = debounce
        self.timeout = timeout
        self.retry_delays = retry_delays
        self._wanted = asyncio.Event()
        self.runs = 0
        """Attempts made (for tests and diagnostics)."""

    def notify(self) -> None:
        """A key was retired (called inside its transaction; the clean-up waits for it to end)."""
        self._wanted.set()

    async def run(self) -> None:
        while True:
            await self._wanted.wait()
            await asyncio.sleep(self.debounce)  # let a burst of retirements share one run
            for attempt, delay in enumerate((0.0, *self.retry_delays), start=1):
                if delay:
                    await asyncio.sleep(delay)
                self._wanted.clear()  # this attempt covers every retirement notified so far
                if await self._attempt(attempt):
                    break

    async def _attempt(self, attempt: int) -> bool:
        self.runs += 1
        last = attempt > len(self.retry_delays)
        then = "giving up; the backup agent and the servers' own checkpoints remove it later" if last \
            else "will retry"
        try:
            async with asyncio.timeout(self.timeout):
                problems = await self._purge(self.timeout - 1.0)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a background task logs and retries, never dies
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            log.warning("retired key WAL clean-up failed (attempt %d): %s; %s", attempt, reason, then)
            return False
        for p in problems:
            log.warning("retired key WAL clean-up (attempt %d): %s; %s", attempt, p, then)
        return not problems
