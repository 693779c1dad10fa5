"""Group commit: concurrent callers' items written together, one flush per batch (pure).

Contract
--------
* :meth:`GroupCommit.submit` queues one item and returns only once a flush
  that held it has returned (for the CA: its transaction committed), or
  raises what that flush raised: a failed flush fails every caller in its
  batch, and each decides what to do (the KeySent auditor spools them).
* One flush at a time, in arrival order. A caller arriving while a flush
  is under way waits for it to end and goes in the next batch, so a quiet
  system adds no wait at all (a lone item is flushed at once, alone) and a
  busy one adds at most the flush under way; batches grow with the load,
  up to ``max_batch`` items (the rest wait for the batch after).
* A caller that stops waiting (cancelled, e.g. by its timeout) before its
  item was taken into a batch withdraws it: it is never flushed. Once
  taken, the item is flushed whatever its caller does (the outcome is then
  unknown to that caller, as for any write abandoned mid-way).
* Flushes run in a task of their own, in a fresh :mod:`contextvars`
  context: nothing of the caller that happened to start the task (its
  deadline, say) leaks into a batch shared with others.

Nothing here knows about databases; :class:`control_plane.spool.KeySentAuditor`
gives it a flush that writes a batch of audit rows in one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


class Closed(Exception):
    """The batcher was stopped (:meth:`GroupCommit.aclose`, or its worker cancelled) before the
    item's batch ended: whether a batch under way was written is unknown."""


def _read(f: asyncio.Future[None]) -> None:
    if not f.cancelled():
        f.exception()


@dataclass(eq=False)
class _Entry(Generic[T]):
    item: T
    done: asyncio.Future[None]
    taken: bool = False


@dataclass
class Stats:
    """Counts since creation: batches flushed (ok or not), items in them, failed batches, withdrawn items."""

    batches: int = 0
    items: int = 0
    failed: int = 0
    withdrawn: int = 0
    largest: int = 0


class GroupCommit(Generic[T]):
    """Batches of items for one ``flush(items)`` coroutine at a time (see the module's contract)."""

    def __init__(self, flush: Callable[[Sequence[T]], Awaitable[None]], *, max_batch: int = 256,
                 on_batch: Callable[[int, BaseException | None], None] | None = None) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._flush = flush
        self.max_batch = max_batch
        self._on_batch = on_batch
        self._queue: deque[_Entry[T]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._in_flight = 0
        self.stats = Stats()

    @property
    def pending(self) -> int:
        """Items queued and not yet taken into a batch (withdrawn ones included until skipped)."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Items in the batch being flushed."""
        return self._in_flight

    async def submit(self, item: T) -> None:
        """Queue ``item``; return once a flush holding it returned, or raise what it raised."""
        if self._closed:
            raise Closed("the batcher is stopped")
        entry = _Entry(item, asyncio.get_running_loop().create_future())
        self._queue.append(entry)
        if self._task is None or self._task.done():
            # A fresh context: the batch is everyone's, not this caller's.
            self._task = asyncio.create_task(self._run(), name="keyward-group-commit",
                                             context=contextvars.Context())
        try:
            await asyncio.shield(entry.done)
        except asyncio.CancelledError:
            if not entry.taken:
                entry.taken = True  # withdrawn: the worker skips it
                self.stats.withdrawn += 1
            # Nobody will read the outcome of a batch under way: it must not be logged as unread.
            entry.done.add_done_callback(_read)
            raise

    def _next_batch(self) -> list[_Entry[T]]:
        batch: list[_Entry[T]] = []
        while self._queue and len(batch) < self.max_batch:
            e = self._queue.popleft()
            if e.taken:  # withdrawn by its caller
                continue
            e.taken = True
            batch.append(e)
        return batch

    async def _run(self) -> None:
        while self._queue:
            batch = self._next_batch()
            if not batch:
                continue
            error: BaseException | None = None
            self._in_flight = len(batch)
            try:
                await self._flush([e.item for e in batch])
            except asyncio.CancelledError as e:  # the worker itself is being stopped (shutdown)
                error = e
                for x in batch:
                    if not x.done.done():
                        x.done.set_exception(Closed("stopped while the batch was being written: outcome unknown"))
                self._fail_queued()
                raise
            except Exception as e:
                error = e
                for x in batch:
                    if not x.done.done():
                        x.done.set_exception(e)
            else:
                for x in batch:
                    if not x.done.done():
                        x.done.set_result(None)
            finally:
                self._in_flight = 0
                self._account(len(batch), error)

    def _fail_queued(self) -> None:
        while self._queue:
            e = self._queue.popleft()
            if not e.done.done():
                e.done.set_exception(Closed("stopped before the item was written"))

    def _account(self, n: int, error: BaseException | None) -> None:
        s = self.stats
        s.batches += 1
        s.items += n
        s.failed += error is not None
        s.largest = max(s.largest, n)
        if self._on_batch is not None:
            self._on_batch(n, error)

    async def aclose(self) -> None:
        """Stop the worker; callers still waiting get :class:`Closed`."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_queued()
