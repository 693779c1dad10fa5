"""Fan-out of key events to WatchKeys streams, across CA replicas.

Events are rows of ``key_events`` (no key material). One hub per process
LISTENs for the store's notification and, on each wake-up and at least once a
second (its own timer, so the poll never depends on the listener), reads rows after the last one it saw and hands them to every
subscriber. A lost notification therefore delays an event by at most the
poll interval; it never loses it. A subscriber that falls too far behind is
closed, and its ZEN resumes with ``after_seq``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from control_plane.errors import KeywardError, Unavailable
from control_plane.store import KeyEventRow, Store

log = logging.getLogger("keyward.ca.events")

POLL_SECONDS = 1.0
QUEUE_DEPTH = 1000


class Overflow(Exception):
    """The subscriber fell behind; it must resume from its last seq."""


class Subscription:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[KeyEventRow | None] = asyncio.Queue(QUEUE_DEPTH)
        self.overflowed = False

    def put(self, ev: KeyEventRow) -> None:
        try:
            self.queue.put_nowait(ev)
        except asyncio.QueueFull:
            self.overflowed = True

    async def get(self) -> KeyEventRow:
        if self.overflowed:
            raise Overflow()
        ev = await self.queue.get()
        if ev is None or self.overflowed:
            raise Overflow()
        return ev


class EventHub:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._subs: set[Subscription] = set()
        self.last_seq = 0
        self._task: asyncio.Task[None] | None = None
        self._primed = False
        self._woken = asyncio.Event()
        self._ready = asyncio.Event()

    async def _prime(self) -> None:
        self.last_seq = await self._store.last_event_seq()
        self._primed = True
        self._ready.set()
        log.info("event hub: ready, the log ends at seq %d", self.last_seq)

    async def start(self) -> None:
        try:
            await self._prime()
        except KeywardError:
            # No server reachable yet: learn where the log ends on the first
            # successful read, so old events are never replayed as new ones.
            self._primed = False
        self._task = asyncio.create_task(self._run(), name="keyward-event-hub")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def ready(self, timeout: float) -> None:
        """Wait until the hub knows where the log ends (its ``last_seq`` is a real position:
        a stream told "0" before that would resume from nothing and miss events)."""
        if not self._ready.is_set():
            try:
                async with asyncio.timeout(timeout):
                    await self._ready.wait()
            except TimeoutError:
                raise Unavailable("the CA has not reached its event log yet; retry WatchKeys shortly") from None

    def subscribe(self) -> Subscription:
        s = Subscription()
        self._subs.add(s)
        return s

    def unsubscribe(self, s: Subscription) -> None:
        self._subs.discard(s)

    async def _drain(self) -> None:
        if not self._primed:
            await self._prime()
            return
        while True:
            rows = await self._store.events_after(self.last_seq)
            for ev in rows:
                self.last_seq = ev.seq
                for s in list(self._subs):
                    s.put(ev)
            if len(rows) < 500:
                return

    async def _listen(self) -> None:
        """Set ``_woken`` on every notification; reconnect after a failure (LISTEN needs the primary)."""
        while True:
            try:
                async for _ in self._store.notifications():
                    self._woken.set()
            except asyncio.CancelledError:
                raise
            except KeywardError as e:
                log.warning("event hub: %s; polling", e)
            except Exception:
                log.exception("event hub listener failed; polling")
            await asyncio.sleep(POLL_SECONDS)

    async def _run(self) -> None:
        listener = asyncio.create_task(self._listen(), name="keyward-event-listen")
        try:
            while True:
                # A notification or the poll timer, whichever comes first.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_SECONDS):
                        await self._woken.wait()
                self._woken.clear()
                try:
                    await self._drain()
                except KeywardError as e:
                    log.warning("event hub: %s; will retry", e)
                except Exception:
                    log.exception("event hub drain failed; will retry")
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
