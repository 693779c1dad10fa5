"""``keyward db watch``: automatic failover outside Kubernetes.

The same decisions as the operator's trigger (``k8s/operator/dbwatch.py``): each look at the
servers goes to :func:`dbops.plan.watch`, the one decision module, and a plan it returns is
carried out by :func:`dbops.failover.execute`. Only the I/O differs: the last primary seen is
kept in a small JSON file beside the cluster spec (the operator keeps it in an annotation), so a
primary lost while no watcher ran still counts after a restart, and nothing is "lost" before a
primary was ever seen (a fresh cluster still starting). Every decision is one JSON log line.

Contract: one watcher per cluster (two would race to promote; the local stack runs one, the
operator holds a Kubernetes lease). A failover starts once no server has answered as primary
for ``after`` seconds; a split brain (two primaries) is reported, never acted on.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dbops import local
from dbops import plan as dbplan
from dbops.failover import FailoverRefused, configure_primary, execute, repoint
from dbops.spec import ClusterSpec
from dbops.status import cluster_status

log = logging.getLogger("keyward.db.watch")

AFTER = 3.0
"""Seconds without any primary before a failover (a restart of the primary takes about 1 s)."""
INTERVAL = 0.5
"""Seconds between looks at the servers."""


@dataclass
class Memory:
    """What the watcher carries from one look to the next (and, for the primary, across restarts)."""

    path: Path
    last_primary: str | None = None
    lost_since: float | None = None
    last_said: str = ""
    unfinished: tuple[str, ...] = ()
    """Servers a failover began by fencing and has not brought back yet: written before the
    failover starts, so a watcher killed in the middle of one finishes it after its restart."""

    @classmethod
    def load(cls, path: Path) -> Memory:
        try:
            d = json.loads(path.read_text())
            return cls(path, d.get("last_primary"), unfinished=tuple(d.get("unfinished") or ()))
        except (OSError, ValueError, TypeError):
            return cls(path)

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"last_primary": self.last_primary, "unfinished": list(self.unfinished)}))
        os.replace(tmp, self.path)  # never a half-written file

    def remember(self, primary: str, *, unfinished: tuple[str, ...] | None = None) -> None:
        new = self.unfinished if unfinished is None else unfinished
        if primary != self.last_primary or new != self.unfinished:
            self.last_primary, self.unfinished = primary, new
            self._save()


def _say(mem: Memory, level: int, msg: str, **fields: object) -> None:
    """Log a state once, not at every look."""
    key = f"{msg}{sorted(fields.items())}"
    if key != mem.last_said:
        mem.last_said = key
        log.log(level, json.dumps({"msg": msg, **fields}))


def look(spec: ClusterSpec, mem: Memory, *, after: float = AFTER) -> object:
    """One look at the servers, and the action it calls for. Returns the verdict (for tests)."""
    sts = cluster_status(spec)
    v = dbplan.watch(spec, sts, last_primary=mem.last_primary, lost_since=mem.lost_since, now=time.monotonic(),
                     after=after, rejoin=any(n.datadir for n in spec.nodes))
    if isinstance(v, dbplan.Healthy):
        mem.lost_since = None
        mem.remember(v.primary)
        _say(mem, logging.INFO, "primary answers", primary=v.primary, back=v.back)
        fix = dbplan.converge(spec, sts, v.primary, mem.unfinished)
        if fix:
            _finish(spec, mem, v.primary, fix)
        elif mem.unfinished:
            mem.remember(v.primary, unfinished=())
    elif isinstance(v, dbplan.SplitBrain):
        _say(mem, logging.ERROR, "split brain: several servers answer as primary; no automatic action, fence all "
             "but one", primaries=list(v.primaries))
    elif isinstance(v, dbplan.Waiting):
        mem.lost_since = v.lost_since
        if v.newly_lost:
            _say(mem, logging.WARNING, "no server answers as primary; failing over unless one returns",
                 last_primary=mem.last_primary, after_seconds=after)
    elif isinstance(v, dbplan.NoFailover):
        _say(mem, logging.ERROR, "failover refused", reason=v.reason)
    else:
        assert isinstance(v, dbplan.FailoverPlan)
        # Before the first step: a watcher killed during the failover finishes it after its restart.
        mem.remember(mem.last_primary or "", unfinished=tuple(n.name for n in v.rejoin))
        try:
            rep = execute(spec, v)
        except FailoverRefused as e:
            _say(mem, logging.ERROR, "failover refused", reason=str(e))
            return v
        mem.lost_since = None
        mem.remember(rep.new_primary, unfinished=())
        _say(mem, logging.WARNING, "failed over", old_primary=rep.old_primary, new_primary=rep.new_primary,
             lsn=rep.promoted_lsn, seconds=round(rep.seconds, 2), steps=rep.steps)
    return v


def _finish(spec: ClusterSpec, mem: Memory, primary: str, fix: dbplan.Converge) -> None:
    """Carry out :func:`dbops.plan.converge`'s repairs (each is safe to do twice)."""
    new = spec.node(primary)
    steps = []
    if fix.configure:
        configure_primary(spec, new)
        steps.append(f"{primary}: slots + synchronous_standby_names = {spec.sync_names(primary)}")
    for n in fix.repoint:
        repoint(spec, n, new)
        steps.append(f"re-pointed {n.name} at {primary}")
    for n in fix.rejoin:
        how = local.rejoin(spec, n, new)
        steps.append(f"rejoined {n.name} as a standby ({how})")
    mem.remember(primary, unfinished=())
    _say(mem, logging.WARNING, "finished an interrupted failover", primary=primary, steps=steps)


def agent(spec: ClusterSpec, *, state: Path, after: float = AFTER, interval: float = INTERVAL,
          stop: threading.Event | None = None) -> None:
    """Look every ``interval`` seconds until ``stop`` is set (a signal ends the process otherwise).
    A look that fails (a server dying mid-failover) is logged; the next look starts from the
    servers' state as it is then."""
    mem = Memory.load(state)
    stop = stop or threading.Event()
    log.info(json.dumps({"msg": "watching", "servers": [n.name for n in spec.nodes], "after_seconds": after,
                         "last_primary": mem.last_primary}))
    while not stop.is_set():
        try:
            look(spec, mem, after=after)
        except Exception as e:  # noqa: BLE001  (the loop must outlive any one look)
            _say(mem, logging.ERROR, "look failed; retrying from the servers' current state",
                 error=type(e).__name__, detail=str(e)[:300])
        stop.wait(interval)
