"""Policy validation in a worker process, so an org admin's large policies never hold the CA's GIL.

Validation is linear (``policy.validate``) but a 1,000-entry-per-list policy still costs tens of
milliseconds of Python; in a thread it ran off the event loop yet held the interpreter lock that
every other tenant's call needs (a storm of 8 such updates made another org's GetKeyPair p99 294
ms). Here it runs in one separate process, started with ``spawn``: a fresh interpreter that never
saw the master secret (a fork would copy the CA's memory). Plain values in, a Policy or an
InvalidArgument out. If the worker dies, the pool is rebuilt and the call fails UNAVAILABLE.
Where no worker process can be started (no writable /dev/shm for its semaphores, a process
limit), validation runs in a thread as before, and the log says so once: slower under a storm,
never wrong.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from control_plane.errors import Unavailable
from control_plane.policy import Policy, validate

log = logging.getLogger("keyward.ca.validator")


def _check(kwargs: dict[str, Any]) -> Policy:
    return validate(**kwargs)


class Validator:
    def __init__(self, workers: int = 1) -> None:
        self._workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self.in_process = True
        """False once a worker process could not be started: validation then runs in a thread."""

    def _executor(self) -> ProcessPoolExecutor | None:
        if self._pool is None and self.in_process:
            try:
                self._pool = ProcessPoolExecutor(self._workers, mp_context=multiprocessing.get_context("spawn"))
            except (OSError, ImportError, NotImplementedError) as e:
                self.in_process = False
                log.warning("policy validation runs in a thread: no worker process (%s)", type(e).__name__)
        return self._pool

    def warm(self) -> None:
        """Start the worker now (a spawned interpreter takes a moment), not on the first update.
        Never raises: a worker that cannot start means validation in a thread."""
        try:
            pool = self._executor()
            if pool is not None:
                pool.submit(int).result(timeout=60)
        except Exception as e:
            self.close()
            self.in_process = False
            log.warning("policy validation runs in a thread: the worker process did not start (%s)",
                        type(e).__name__)

    async def validate(self, **kwargs: Any) -> Policy:
        pool = self._executor()
        if pool is None:
            return await asyncio.to_thread(_check, kwargs)
        try:
            return await asyncio.wrap_future(pool.submit(_check, kwargs))
        except BrokenProcessPool:
            log.warning("policy validator process died; starting a new one")
            self.close()
            raise Unavailable("policy validation was interrupted; retry") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
