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

from dbops import plan as dbplan
from dbops.failover import FailoverRefused, execute
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

    @classmethod
    def load(cls, path: Path) -> Memory:
        try:
            return cls(path, json.loads(path.read_text()).get("last_primary"))
        except (OSError, ValueError):
            return cls(path)

    def remember(self, primary: str) -> None:
        if primary != self.last_primary:
            self.last_primary = primary
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"last_primary": primary}))
            os.replace(tmp, self.path)  # never a half-written file


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
        try:
            rep = execute(spec, v)
        except FailoverRefused as e:
            _say(mem, logging.ERROR, "failover refused", reason=str(e))
            return v
        mem.lost_since = None
        mem.remember(rep.new_primary)
        _say(mem, logging.WARNING, "failed over", old_primary=rep.old_primary, new_primary=rep.new_primary,
             lsn=rep.promoted_lsn, seconds=round(rep.seconds, 2), steps=rep.steps)
    return v


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
