"""Auditing of keys sent, surviving a primary outage.

Every key sent is an audit event. While the primary is down the CA still
serves keys from a standby; the event then goes to an append-only spool
file (one JSON line, fsync'd before the key is sent) and is written to the
audit log when a primary is back. Spool lines hold ids only, never key
material. Without a spool file configured, a key whose sending cannot be
audited is not sent.

An event is in the log at least once: a direct write given up on (no answer
within DIRECT_TIMEOUT) may still commit, and its spooled copy follows
("spooled at ..."). Appending never waits for the flush, which writes to a
primary that may be as stuck as the one the append stands in for.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os

from control_plane.deadline import remaining
from control_plane.errors import DeadlineExceeded, KeywardError, Unavailable
from control_plane.store import Actor, Store

log = logging.getLogger("keyward.ca.audit")

DIRECT_TIMEOUT = 1.0
RESERVE = DIRECT_TIMEOUT + 0.5
"""What :meth:`KeySentAuditor.key_sent` may take of a call's time: the direct write, then the
spool's fsync and the reply. The key's read leaves it (:func:`control_plane.deadline.keep`)."""
FLUSH_SECONDS = 2.0


class KeySentAuditor:
    def __init__(self, store: Store, spool_path: str) -> None:
        self._store = store
        self._path = spool_path
        self._lock = asyncio.Lock()
        """Held to append a line, and to read or rewrite the file; never while the flush writes to
        the database (:attr:`_flushing`, one flush at a time)."""
        self._flushing = asyncio.Lock()

    async def key_sent(self, actor: Actor, org_id: str, key_id: str, detail: str) -> None:
        # Within the call's deadline, leaving the spool its fsync (or the caller its refusal).
        wait = remaining(30.0) - 0.3
        try:
            await self._store.bounded(
                self._store.audit(actor, "KeySent", org_id=org_id, key_id=key_id, detail=detail),
                min(DIRECT_TIMEOUT, wait) if self._path else wait)
            return
        except (Unavailable, DeadlineExceeded, TimeoutError):
            if not self._path:
                raise Unavailable("the audit log is unavailable, so the key is not sent; retry later") from None
        line = json.dumps({"actor": actor.spiffe_id, "org_id": org_id, "key_id": key_id, "detail": detail,
                           "at": dt.datetime.now(dt.UTC).isoformat()}) + "\n"
        async with self._lock:
            await asyncio.to_thread(self._append, line)

    def _append(self, line: str) -> None:
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def _lines(self) -> list[str]:
        try:
            with open(self._path) as f:
                return [ln for ln in f.read().splitlines() if ln.strip()]
        except FileNotFoundError:
            return []

    def _drop(self, done: int) -> None:
        """Remove the first ``done`` lines (written to the log), keeping any appended since."""
        rest = self._lines()[done:]
        tmp = self._path + ".tmp"
        with open(tmp, "w") as f:
            f.write("".join(x + "\n" for x in rest))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path)

    async def flush(self) -> int:
        """Write spooled events to the audit log; return how many."""
        if not self._path:
            return 0
        async with self._flushing:
            async with self._lock:
                lines = self._lines()
            done = 0
            try:
                for ln in lines:
                    e = json.loads(ln)
                    await self._store.audit(Actor(e["actor"]), "KeySent", org_id=e["org_id"], key_id=e["key_id"],
                                            detail=f"{e['detail']} (spooled at {e['at']})")
                    done += 1
            finally:
                if done:  # lines are only appended meanwhile: the first ``done`` are those written
                    async with self._lock:
                        await asyncio.to_thread(self._drop, done)
            if done:
                log.info("wrote %d spooled KeySent audit events", done)
            return done

    async def run(self) -> None:
        while True:
            with contextlib.suppress(KeywardError):  # still no primary: next time
                await self.flush()
            await asyncio.sleep(FLUSH_SECONDS)
