"""The background WAL clean-up after a retirement: debounced, retried, logged, never raised."""

from __future__ import annotations

import asyncio
import logging

import pytest

from control_plane.walpurge import WalPurger


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_burst_shares_one_run_and_one_during_a_run_causes_one_more() -> None:
    calls: list[float] = []
    entered, release = asyncio.Queue[None](), asyncio.Queue[None]()

    async def purge(budget: float) -> list[str]:
        calls.append(budget)
        await entered.put(None)
        await release.get()
        return []

    p = WalPurger(purge, debounce=0.01, timeout=5.0)
    task = asyncio.create_task(p.run())
    for _ in range(5):
        p.notify()
    await asyncio.wait_for(entered.get(), 5)
    for _ in range(3):
        p.notify()  # during the run
    await release.put(None)
    await asyncio.wait_for(entered.get(), 5)
    await release.put(None)
    assert len(calls) == 2 and all(0 < b < 5.0 for b in calls)
    assert not p._wanted.is_set()  # nothing left to do
    await _stop(task)


async def test_a_failure_is_a_warning_and_is_retried(caplog: pytest.LogCaptureFixture) -> None:
    outcomes: list[BaseException | list[str]] = [RuntimeError("permission denied for function pg_switch_wal"), []]
    done = asyncio.Event()

    async def purge(budget: float) -> list[str]:
        o = outcomes.pop(0)
        if isinstance(o, BaseException):
            raise o
        done.set()
        return o

    p = WalPurger(purge, debounce=0.0, retry_delays=(0.01,))
    task = asyncio.create_task(p.run())
    with caplog.at_level(logging.WARNING, logger="keyward.ca.walpurge"):
        p.notify()
        await asyncio.wait_for(done.wait(), 5)
    assert p.runs == 2
    assert [r.getMessage() for r in caplog.records] == [
        "retired key WAL clean-up failed (attempt 1): permission denied for function pg_switch_wal; will retry"]
    await _stop(task)


async def test_problems_are_retried_then_given_up_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    async def purge(budget: float) -> list[str]:
        return ["standby 127.0.0.1:5433 did not replay in time"]

    p = WalPurger(purge, debounce=0.0, retry_delays=(0.0, 0.01))
    task = asyncio.create_task(p.run())
    with caplog.at_level(logging.WARNING, logger="keyward.ca.walpurge"):
        p.notify()
        async with asyncio.timeout(5):  # a bounded wait for the last attempt's warning
            while not any("giving up" in r.getMessage() for r in caplog.records):
                await asyncio.sleep(0.001)
    await _stop(task)
    assert p.runs == 3
    assert [r.getMessage().split(": ", 1)[0] for r in caplog.records] == [
        f"retired key WAL clean-up (attempt {i})" for i in (1, 2, 3)]
    assert all("did not replay in time" in r.getMessage() for r in caplog.records)
