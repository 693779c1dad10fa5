"""Auditing of keys sent, surviving a primary outage.

Every key sent is an audit event. While the primary is down the CA still
serves keys from a standby; the event then goes to an append-only spool
file (one JSON line, fsync'd before the key is sent) and is written to the
audit log when a primary is back. Spool lines hold ids only, never key
material. Without a spool file configured, a key whose sending cannot be
audited is not sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os

from control_plane.errors import KeywardError, Unavailable
from control_plane.store import Actor, Store

log = logging.getLogger("keyward.ca.audit")

DIRECT_TIMEOUT = 1.0
FLUSH_SECONDS = 2.0


class KeySentAuditor:
    def __init__(self, store: Store, spool_path: str) -> None:
        self._store = store
        self._path = spool_path
        self._lock = asyncio.Lock()

    async def key_sent(self, actor: Actor, org_id: str, key_id: str, detail: str) -> None:
        try:
            async with asyncio.timeout(DIRECT_TIMEOUT if self._path else 30):
                await self._store.audit(actor, "KeySent", org_id=org_id, key_id=key_id, detail=detail)
            return
        except (Unavailable, TimeoutError):
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

    async def flush(self) -> int:
        """Write spooled events to the audit log; return how many."""
        if not self._path:
            return 0
        async with self._lock:
            try:
                with open(self._path) as f:
                    lines = [ln for ln in f.read().splitlines() if ln.strip()]
            except FileNotFoundError:
                return 0
            done = 0
            try:
                for ln in lines:
                    e = json.loads(ln)
                    await self._store.audit(Actor(e["actor"]), "KeySent", org_id=e["org_id"], key_id=e["key_id"],
                                            detail=f"{e['detail']} (spooled at {e['at']})")
                    done += 1
            finally:
                rest = lines[done:]
                tmp = self._path + ".tmp"
                with open(tmp, "w") as f:
                    f.write("".join(x + "\n" for x in rest))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self._path)
            if done:
                log.info("wrote %d spooled KeySent audit events", done)
            return done

    async def run(self) -> None:
        while True:
            with contextlib.suppress(KeywardError):  # still no primary: next time
                await self.flush()
            await asyncio.sleep(FLUSH_SECONDS)
