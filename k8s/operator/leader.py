"""Leader election on a coordination.k8s.io Lease, as client-go's leaderelection does it.

Several operator replicas may run; only the holder of the Lease
``<release>-operator`` acts. The decision is a pure function of the Lease as
read, what this replica last observed of it and when (its own monotonic
clock, so clock skew between nodes cannot make a live leader look expired),
and who it is. The shell (:class:`Elector`) reads, writes with the Lease's
resourceVersion (a lost race is a 409, never two leaders), and renews.

A leader that cannot renew within ``renew_deadline`` (10 s, well inside the
15 s Lease) gives up leadership; the caller then stops acting at once: the
process exits on the spot (a failover running in a thread cannot be
cancelled any other way) and is restarted as a follower. A leader that stops cleanly releases the Lease, so a follower
takes over within one retry period instead of a whole lease duration.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Any

from k8s.operator.kube import Kube, KubeError, Obj, path

log = logging.getLogger("keyward.leader")
API = "coordination.k8s.io/v1"


@dataclass(frozen=True)
class Timing:
    lease_seconds: float = 15.0
    """How long a Lease not renewed stays held (client-go's default, 15 s)."""
    renew_deadline: float = 10.0
    """A leader that has not renewed for this long stops acting (before others may take over)."""
    retry: float = 2.0
    """Seconds between attempts, and between renewals."""


@dataclass(frozen=True)
class Observed:
    """The Lease record (holder, renewTime, transitions) last seen, and when (monotonic)."""

    record: tuple[str, str, int]
    at: float


def record(lease: Obj | None) -> tuple[str, str, int]:
    spec = (lease or {}).get("spec") or {}
    return (str(spec.get("holderIdentity") or ""), str(spec.get("renewTime") or ""),
            int(spec.get("leaseTransitions") or 0))


def decide(lease: Obj | None, me: str, seen: Observed | None, now: float, timing: Timing) -> str:
    """What to do with the Lease as read now: "create", "renew", "acquire" or "wait"."""
    if lease is None:
        return "create"
    holder = record(lease)[0]
    if holder == me:
        return "renew"
    if not holder:
        return "acquire"  # released by its last holder
    if seen is None or seen.record != record(lease):
        return "wait"  # it moved since we last looked: the holder is alive
    return "acquire" if now - seen.at >= timing.lease_seconds else "wait"


def _micro(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Elector:
    def __init__(self, kube: Kube, namespace: str, name: str, me: str, timing: Timing = Timing()) -> None:
        self.kube, self.ns, self.name, self.me, self.timing = kube, namespace, name, me, timing
        self._seen: Observed | None = None
        self.renewed_at = 0.0

    @property
    def _path(self) -> str:
        return path(API, "leases", self.ns, self.name)

    def _spec(self, old: Obj | None, transition: bool) -> dict[str, Any]:
        now = time.time()
        spec = dict((old or {}).get("spec") or {})
        if transition or not spec.get("acquireTime"):
            spec["acquireTime"] = _micro(now)
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if old else 0)
        spec.update(holderIdentity=self.me, leaseDurationSeconds=int(self.timing.lease_seconds),
                    renewTime=_micro(now))
        return spec

    async def try_once(self) -> bool:
        """One attempt to hold the Lease; True if this replica holds it now."""
        lease = await self.kube.get(self._path)
        now = time.monotonic()
        action = decide(lease, self.me, self._seen, now, self.timing)
        if self._seen is None or lease is None or self._seen.record != record(lease):
            self._seen = Observed(record(lease), now)
        try:
            if action == "create":
                await self.kube.create(path(API, "leases", self.ns), {
                    "apiVersion": API, "kind": "Lease", "metadata": {"name": self.name, "namespace": self.ns},
                    "spec": self._spec(None, True)})
            elif action in ("renew", "acquire"):
                assert lease is not None
                body = {**lease, "spec": self._spec(lease, action == "acquire")}
                await self.kube.replace(self._path, body)  # carries resourceVersion: a lost race is a 409
                if action == "acquire":
                    log.info("acquired the lease %s (was %r)", self.name, record(lease)[0])
            else:
                return False
        except KubeError as e:
            if e.status == 409:
                return False
            raise
        self.renewed_at = time.monotonic()
        return True

    async def acquire(self) -> None:
        """Wait until this replica is the leader. Any failure to read or write the Lease (an API
        server restarting drops connections in many ways) means "not leader yet"."""
        while True:
            try:
                if await asyncio.wait_for(self.try_once(), timeout=self.timing.renew_deadline):
                    return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - never leader by accident
                log.warning("leader election: %s: %s", type(e).__name__, e)
            await asyncio.sleep(self.timing.retry)

    async def hold(self) -> None:
        """Renew every ``retry`` seconds; return (leadership lost) as soon as another replica holds the
        Lease, or ``renew_deadline`` after the last renewal at the latest, however slow the API is:
        each attempt is cut off at the deadline, which stays well inside the Lease's duration, so
        this replica has stopped before any other may take over."""
        while True:
            await asyncio.sleep(self.timing.retry)
            left = self.renewed_at + self.timing.renew_deadline - time.monotonic()
            if left <= 0:
                break
            try:
                if await asyncio.wait_for(self.try_once(), timeout=left):
                    continue
                log.error("lost the lease %s to %r", self.name, self._seen.record[0] if self._seen else "?")
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a failed renewal; the deadline decides
                log.warning("could not renew the lease %s: %s: %s", self.name, type(e).__name__, e)
        log.error("could not renew the lease %s for %.0f s: stepping down", self.name, self.timing.renew_deadline)

    async def release(self) -> None:
        """Hand the Lease back (a clean stop), so a follower need not wait for it to expire."""
        try:
            lease = await self.kube.get(self._path)
            if lease is not None and record(lease)[0] == self.me:
                spec = {**lease["spec"], "holderIdentity": "", "leaseDurationSeconds": 1}
                await self.kube.replace(self._path, {**lease, "spec": spec})
                log.info("released the lease %s", self.name)
        except Exception as e:  # noqa: BLE001 - it expires by itself then
            log.warning("could not release the lease %s: %s", self.name, e)
