"""Samples every server's role in rounds (one query per server, in parallel): a round where two
servers answered ``pg_is_in_recovery() = false`` is two writable primaries at once."""

from __future__ import annotations

import threading
import time
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
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @staticmethod
    def _role(n: PgServer) -> str:
        try:
            with psycopg.connect(f"host={n.root} port={n.port} dbname=postgres user=postgres connect_timeout=2",
                                 autocommit=True) as c:
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

    def start(self) -> threading.Thread:
        th = threading.Thread(target=self.run, daemon=True, name="monitor")
        th.start()
        return th

    def between(self, t0: float, t1: float) -> list[Round]:
        with self.lock:
            return [r for r in self.rounds if t0 <= r.t <= t1]

    def any_answered_near(self, t: float, slack: float = 2.5) -> bool:
        """A server answered (any role) in a round started within ``slack`` s before ``t``."""
        with self.lock:
            return any(t - slack <= r.t <= t and any(v != "down" for v in r.roles.values()) for r in self.rounds)

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

