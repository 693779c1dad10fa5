"""control_plane.validator: policies validated in a spawned worker, or in a thread where none starts."""

from __future__ import annotations

import asyncio
import multiprocessing

import pytest

from control_plane.errors import InvalidArgument
from control_plane.policy import FailMode
from control_plane.validator import Validator

ARGS = dict(private_zen_only=False, fail_mode=FailMode.OPEN, key_idle_timeout_seconds=0, location_cidrs=[],
            blocked_hosts=["Shop.Example"], blocked_url_prefixes=[], do_not_inspect_hosts=[])


def _run(v: Validator, **kw: object) -> object:
    async def go() -> object:
        return await v.validate(**{**ARGS, **kw})
    return asyncio.run(go())


def test_the_worker_validates_and_its_refusals_reach_the_caller() -> None:
    v = Validator()
    try:
        v.warm()
        assert v.in_process
        assert _run(v).blocked_hosts == ("shop.example",)  # type: ignore[attr-defined]
        with pytest.raises(InvalidArgument, match="is not a host name"):
            _run(v, blocked_hosts=["not a host"])
    finally:
        v.close()


def test_without_a_worker_process_validation_runs_in_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_processes(method: str) -> object:
        raise OSError(30, "Read-only file system")  # as sem_open fails without a writable /dev/shm

    monkeypatch.setattr(multiprocessing, "get_context", no_processes)
    v = Validator()
    v.warm()  # does not raise
    assert not v.in_process
    assert _run(v).blocked_hosts == ("shop.example",)  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgument):
        _run(v, blocked_hosts=["not a host"])
