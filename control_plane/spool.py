"""Auditing of keys sent, surviving a primary outage.

Every key sent is an audit event, written before the key is. Concurrent
calls share the write (group commit, :mod:`control_plane.groupcommit`): the
KeySent rows of calls arriving while one transaction is under way are
appended together in the next one, chained in their order, with one wait
for the synchronous standbys; each call returns only once the transaction
holding its row committed. A quiet CA writes each row at once, alone.

While the primary is down the CA still serves keys from a standby; the
event then goes to an append-only spool file (one JSON line, fsync'd before
the key is sent; lines of concurrent calls share one fsync) and is written
to the audit log when a primary is back. A call falls back to the spool when
its row is not committed within DIRECT_TIMEOUT, or its batch failed for want
of a database (the whole batch then does). Spool lines hold ids only, never
key material. Without a spool file configured, a key whose sending cannot
be audited is not sent.

An event is in the log at least once: a transaction given up on (no answer
within DIRECT_TIMEOUT) may still commit, and its spooled copies follow
("spooled at ..."). Appending never waits for the flush, which writes to a
primary that may be as stuck as the one the append stands in for.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from control_plane import metrics
from control_plane.deadline import CALL_DEADLINE, remaining
from control_plane.errors import DeadlineExceeded, KeywardError, Unavailable
from control_plane.groupcommit import Closed, GroupCommit
from control_plane.store import Actor, AuditEntry, Store

log = logging.getLogger("keyward.ca.audit")

DIRECT_TIMEOUT = 1.0
"""How long a call waits for its KeySent row to commit before spooling it (with a spool)."""
RESERVE = DIRECT_TIMEOUT + 0.5
"""What :meth:`KeySentAuditor.key_sent` may take of a call's time: the direct write, then the
spool's fsync and the reply. The key's read leaves it (:func:`control_plane.deadline.keep`)."""
REPLY_MARGIN = 0.3
"""Of a call's deadline, kept for the spool's fsync (or the caller's refusal) after the wait."""
TX_RESERVE = 0.5
"""What the store keeps back of a deadline (:meth:`control_plane.store.tx.Database._tx`): a batch's
deadline is its most patient caller's end plus this, so its transaction ends by then."""
MAX_BATCH = 256
"""KeySent rows in one transaction at most (spooled lines in one fsync: the same)."""
FLUSH_SECONDS = 2.0
REPLAY_BATCH = 100
"""Spooled events written back per transaction."""


@dataclass(frozen=True)
class _Sent:
    entry: AuditEntry
    until: float
    """time.monotonic() when its caller stops waiting."""


def _count(n: int, error: BaseException | None) -> None:
    if error is None:
        metrics.AUDIT_COMMITS.inc()
        metrics.AUDIT_BATCH_ROWS.observe(n)
    else:
        metrics.AUDIT_BATCH_FAILURES.inc()


class KeySentAuditor:
    def __init__(self, store: Store, spool_path: str, *, max_batch: int = MAX_BATCH) -> None:
        self._store = store
        self._path = spool_path
        self._lock = asyncio.Lock()
        """Held to append lines, and to read or rewrite the file; never while the flush writes to
        the database (:attr:`_flushing`, one flush at a time)."""
        self._flushing = asyncio.Lock()
        self.batches = GroupCommit(self._write, max_batch=max_batch, on_batch=_count)
        self._spool = GroupCommit(self._append_lines, max_batch=max_batch)
        metrics.AUDIT_ROWS_WAITING.set_function(lambda: self.batches.pending)
        metrics.AUDIT_ROWS_IN_FLIGHT.set_function(lambda: self.batches.in_flight)

    async def key_sent(self, actor: Actor, org_id: str, key_id: str, detail: str) -> None:
        """Return once the KeySent event is durable: its row committed, or its line in the spool
        file (raises :class:`Unavailable` when it is neither: the key must not be sent)."""
        # Within the call's deadline, leaving the spool its fsync (or the caller its refusal).
        wait = remaining(30.0) - REPLY_MARGIN
        wait = min(DIRECT_TIMEOUT, wait) if self._path else wait
        until = time.monotonic() + wait
        sent = _Sent(AuditEntry(actor, "KeySent", org_id=org_id, key_id=key_id, detail=detail), until)
        try:
            # Giving up only stops the waiting: the batch is everyone's (its row, once taken, may commit).
            async with asyncio.timeout(max(0.0, wait)):
                await self.batches.submit(sent)
            return
        except (Unavailable, DeadlineExceeded, Closed, TimeoutError):
            # No primary, or none in time (a batch that failed so fails all its callers alike).
            if not self._path:
                raise Unavailable("the audit log is unavailable, so the key is not sent; retry later") from None
        line = json.dumps({"actor": actor.spiffe_id, "org_id": org_id, "key_id": key_id, "detail": detail,
                           "at": dt.datetime.now(dt.UTC).isoformat()}) + "\n"
        await self._spool.submit(line)

    async def _write(self, batch: Sequence[_Sent]) -> None:
        """One transaction for the batch's rows, bounded by its most patient caller: nobody
        waits for it after that (the worker's own context: the deadline is the batch's). Given up
        on then, it is abandoned (:meth:`Store.bounded`), not waited out: the next batch goes on."""
        until = max(s.until for s in batch)
        CALL_DEADLINE.set(until + TX_RESERVE)  # the store keeps TX_RESERVE back: it ends by `until`
        await self._store.bounded(self._store.audit_many([s.entry for s in batch]),
                                  until + TX_RESERVE - time.monotonic())

    async def _append_lines(self, lines: Sequence[str]) -> None:
        async with self._lock:
            await asyncio.to_thread(self._append, "".join(lines))

    def _append(self, text: str) -> None:
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, text.encode())
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
        """Write spooled events to the audit log (REPLAY_BATCH per transaction); return how many."""
        if not self._path:
            return 0
        async with self._flushing:
            async with self._lock:
                lines = self._lines()
            done = 0
            try:
                while done < len(lines):
                    chunk = lines[done:done + REPLAY_BATCH]
                    entries, bad = _parse(chunk)
                    if entries:
                        await self._store.audit_many(entries)
                    if bad:  # after the good ones are written: a failed write quarantines nothing twice
                        await asyncio.to_thread(self._quarantine, bad)
                    done += len(chunk)
            finally:
                if done:  # lines are only appended meanwhile: the first ``done`` are those written
                    async with self._lock:
                        await asyncio.to_thread(self._drop, done)
            if done:
                log.info("wrote %d spooled KeySent audit events", done)
            return done

    def _quarantine(self, bad: Sequence[str]) -> None:
        """Lines that are no spooled event (torn by a crash or a full disk mid-write) go to
        ``<spool>.malformed`` for an operator, said once each in the log (where, not what): they
        must neither stop the spool nor be lost without a word."""
        fd = os.open(self._path + ".malformed", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, "".join(x + "\n" for x in bad).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        log.error("%d spooled line(s) that are no KeySent event were moved to %s.malformed; the "
                  "events they held, if any, are not in the audit log", len(bad), self._path)

    async def run(self) -> None:
        while True:
            try:
                await self.flush()
            except KeywardError:
                pass  # still no primary: next time
            except Exception:  # the flusher must outlive any one failure: the spool is the audit's
                log.exception("spool flush failed; retrying in %gs", FLUSH_SECONDS)
            await asyncio.sleep(FLUSH_SECONDS)

    async def aclose(self) -> None:
        await self.batches.aclose()
        await self._spool.aclose()


def _parse(lines: Sequence[str]) -> tuple[list[AuditEntry], list[str]]:
    """The spooled events among ``lines`` as audit entries, and the lines that are none."""
    entries: list[AuditEntry] = []
    bad: list[str] = []
    for ln in lines:
        try:
            e = json.loads(ln)
            entries.append(AuditEntry(Actor(str(e["actor"])), "KeySent", org_id=str(e["org_id"]),
                                      key_id=str(e["key_id"]), detail=f"{e['detail']} (spooled at {e['at']})"))
        except (ValueError, KeyError, TypeError):
            bad.append(ln)
    return entries, bad
