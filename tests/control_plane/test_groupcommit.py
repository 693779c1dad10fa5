"""control_plane.groupcommit: concurrent items share a flush; each caller returns after its own.

No server and no clock: flushes are held and released by events, so which
items share a batch is decided by the order of events alone.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc as garbage
from collections.abc import Sequence
from typing import Any

import pytest

from control_plane.groupcommit import Closed, GroupCommit

WHO: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="nobody")


class Held:
    """A flush that records its batches and waits for a release before returning each."""

    def __init__(self, fail: set[int] | None = None) -> None:
        self.batches: list[list[Any]] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.fail = fail or set()  # batch numbers (0-based) that raise
        self.seen_context: list[str] = []

    async def __call__(self, items: Sequence[Any]) -> None:
        n = len(self.batches)
        self.batches.append(list(items))
        self.seen_context.append(WHO.get())
        self.started.set()
        await self.release.wait()
        self.release.clear()
        self.started.clear()
        if n in self.fail:
            raise RuntimeError(f"batch {n} failed")


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_lone_item_is_flushed_at_once_alone() -> None:
    got: list[list[int]] = []

    async def flush(items: Sequence[int]) -> None:
        got.append(list(items))

    gc = GroupCommit(flush)
    await gc.submit(1)
    await gc.submit(2)
    assert got == [[1], [2]]
    assert gc.stats.batches == 2 and gc.stats.items == 2 and gc.pending == 0


async def test_items_arriving_during_a_flush_share_the_next_and_wait_for_it() -> None:
    f = Held()
    gc = GroupCommit(f)
    first = asyncio.create_task(gc.submit(0))
    await f.started.wait()
    rest = [asyncio.create_task(gc.submit(i)) for i in range(1, 6)]
    await settle()
    assert f.batches == [[0]] and gc.pending == 5  # queued behind the flush under way
    f.release.set()
    await first
    await f.started.wait()
    assert f.batches == [[0], [1, 2, 3, 4, 5]]  # one batch, in arrival order
    await settle()
    assert not any(t.done() for t in rest), "a caller returned before its batch's flush did"
    f.release.set()
    await asyncio.gather(*rest)
    assert gc.stats.batches == 2 and gc.stats.largest == 5


async def test_batches_are_bounded() -> None:
    f = Held()
    gc = GroupCommit(f, max_batch=4)
    tasks = [asyncio.create_task(gc.submit(i)) for i in range(10)]
    for _ in range(3):
        await f.started.wait()
        f.release.set()
        await settle()
    await asyncio.gather(*tasks)
    assert f.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


async def test_a_failed_flush_fails_every_caller_of_its_batch_and_no_other() -> None:
    f = Held(fail={1})
    gc = GroupCommit(f, on_batch=lambda n, err: outcomes.append((n, type(err).__name__ if err else None)))
    outcomes: list[tuple[int, str | None]] = []
    a = asyncio.create_task(gc.submit("a"))
    await f.started.wait()
    bs = [asyncio.create_task(gc.submit(f"b{i}")) for i in range(3)]
    await settle()
    f.release.set()
    await a
    await f.started.wait()
    c = asyncio.create_task(gc.submit("c"))
    await settle()
    f.release.set()
    results = await asyncio.gather(*bs, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and "batch 1 failed" in str(r) for r in results)
    await f.started.wait()
    f.release.set()
    await c  # the batch after a failed one is written as usual
    assert f.batches == [["a"], ["b0", "b1", "b2"], ["c"]]
    assert outcomes == [(1, None), (3, "RuntimeError"), (1, None)]
    assert gc.stats.failed == 1


async def test_a_caller_that_gives_up_before_its_batch_is_taken_withdraws_its_item() -> None:
    f = Held()
    gc = GroupCommit(f)
    first = asyncio.create_task(gc.submit("first"))
    await f.started.wait()
    quitter = asyncio.create_task(gc.submit("quitter"))
    stayer = asyncio.create_task(gc.submit("stayer"))
    await settle()
    quitter.cancel()
    await settle()
    f.release.set()
    await first
    await f.started.wait()
    f.release.set()
    await stayer
    assert quitter.cancelled()
    assert f.batches == [["first"], ["stayer"]]  # never written
    assert gc.stats.withdrawn == 1


async def test_once_taken_an_item_is_written_even_if_its_caller_gives_up() -> None:
    unread: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: unread.append(ctx))
    f = Held(fail={0})
    gc = GroupCommit(f)
    t = asyncio.create_task(gc.submit("x"))
    await f.started.wait()
    t.cancel()  # e.g. its timeout: the batch goes on
    await settle()
    f.release.set()
    await settle()
    assert t.cancelled() and f.batches == [["x"]] and gc.stats.failed == 1
    del t  # the last reference to the caller's future: its outcome is unread for good
    garbage.collect()
    await settle()
    assert not unread, unread  # the failure nobody waits for is not logged as "never retrieved"


async def test_the_flush_does_not_run_in_the_context_of_the_caller_that_started_it() -> None:
    f = Held()
    gc = GroupCommit(f)

    async def as_(who: str) -> None:
        WHO.set(who)
        await gc.submit(who)

    t = asyncio.create_task(as_("alice"))
    await f.started.wait()
    f.release.set()
    await t
    assert f.seen_context == ["nobody"]


async def test_closing_fails_the_waiting_callers_with_closed() -> None:
    f = Held()
    gc = GroupCommit(f)
    under_way = asyncio.create_task(gc.submit(1))
    await f.started.wait()
    queued = asyncio.create_task(gc.submit(2))
    await settle()
    await gc.aclose()
    for t in (under_way, queued):
        with pytest.raises(Closed):
            await t
    with pytest.raises(Closed):
        await gc.submit(3)


def test_max_batch_must_be_positive() -> None:
    async def flush(items: Sequence[int]) -> None:
        pass
    with pytest.raises(ValueError):
        GroupCommit(flush, max_batch=0)


async def test_many_concurrent_callers_each_return_after_their_item_was_flushed() -> None:
    flushed: set[int] = set()

    async def flush(items: Sequence[int]) -> None:
        await asyncio.sleep(0)
        flushed.update(items)

    gc = GroupCommit(flush, max_batch=16)

    async def one(i: int) -> None:
        await gc.submit(i)
        assert i in flushed

    await asyncio.gather(*(one(i) for i in range(500)))
    assert flushed == set(range(500))
    assert gc.stats.items == 500 and gc.stats.batches < 100 and gc.stats.largest <= 16
