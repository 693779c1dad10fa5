"""Samples every server's role in rounds (one query per server, in parallel): a round where two
servers answered ``pg_is_in_recovery() = false`` is two writable primaries at once.

And when each server answered at all: one sampler per server (a query every 0.1 s on a
connection of its own), so that a frozen server, which holds up a round until its connect timeout,
delays no other server's samples. A ZEN read that failed while some server answered is held
against the CA (tests/chaos/test_campaign.py)."""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import psycopg

from devstack.pg import PgCluster, PgServer


@dataclass
class Round:
    t: float
    roles: dict[str, str]  # name -> primary | standby | down


@dataclass
class Monitor:
    cluster: PgCluster
    rounds: list[Round] = field(default_factory=list)
    answers: dict[str, list[float]] = field(default_factory=dict)
    """Per server, when it answered a sample (time.monotonic(), ascending)."""
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @staticmethod
    def _dsn(n: PgServer) -> str:
        # Over the server's Unix socket: reached during a cut of its link too (see answered_during).
        return f"host={n.root} port={n.port} dbname=postgres user=postgres connect_timeout=2"

    @classmethod
    def _role(cls, n: PgServer) -> str:
        try:
            with psycopg.connect(cls._dsn(n), autocommit=True) as c:
                c.execute("SET statement_timeout = '2s'")
                row = c.execute("SELECT pg_is_in_recovery()").fetchone()
                return "standby" if row and row[0] else "primary"
        except psycopg.Error:
            return "down"

    def run(self) -> None:
        with ThreadPoolExecutor(len(self.cluster.nodes)) as ex:
            while not self.stop.is_set():
                t = time.monotonic()
                roles = dict(zip([n.name for n in self.cluster.nodes], ex.map(self._role, self.cluster.nodes), strict=True))
                with self.lock:
                    self.rounds.append(Round(t, roles))
                self.stop.wait(0.1)

    def _sample(self, n: PgServer) -> None:
        """Record each answer of ``n``; a query to a frozen server waits until it is thawed (no
        answer meanwhile), a dead one's connection is made again."""
        conn: psycopg.Connection[tuple[object, ...]] | None = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = psycopg.connect(self._dsn(n), autocommit=True)
                conn.execute("SELECT 1")
                with self.lock:
                    self.answers[n.name].append(time.monotonic())
            except psycopg.Error:
                if conn is not None:
                    conn.close()
                conn = None
            self.stop.wait(0.1)
        if conn is not None:
            conn.close()

    def start(self) -> threading.Thread:
        for n in self.cluster.nodes:
            self.answers[n.name] = []
            threading.Thread(target=self._sample, args=(n,), daemon=True, name=f"monitor-{n.name}").start()
        th = threading.Thread(target=self.run, daemon=True, name="monitor")
        th.start()
        return th

    def between(self, t0: float, t1: float) -> list[Round]:
        with self.lock:
            return [r for r in self.rounds if t0 <= r.t <= t1]

    def answered_during(self, t0: float, t1: float,
                        unreachable: Mapping[str, Sequence[tuple[float, float]]] | None = None) -> bool:
        """Some server answered between ``t0`` and ``t1``, outside the windows in which the CA
        could not reach it (``unreachable``: its link cut, which these samples, over its Unix
        socket, do not see)."""
        with self.lock:
            for name, ts in self.answers.items():
                for t in ts[bisect.bisect_left(ts, t0):bisect.bisect_right(ts, t1)]:
                    if not any(a <= t <= b for a, b in (unreachable or {}).get(name, ())):
                        return True
        return False

    def down_until(self, name: str, t0: float, t1: float) -> float:
        """When ``name`` was last seen down, from ``t0``, before a round first saw it answer again
        (the start of that last "down" round: it was down at least until then); ``t1`` if no round
        in [t0, t1] saw it answer. Another hand may have restarted it (the watcher rejoins a server
        its failover fenced) before the harness did."""
        last = t0
        for r in self.between(t0, t1):
            if r.roles.get(name, "down") != "down":
                return last
            last = r.t
        return t1
