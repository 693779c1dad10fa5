"""The faults of the campaign, each an injection and the healing a supervisor would do.

A fault runs in a thread of its own from its injection to its healing (a stall ends with
SIGCONT after its seeded duration, a killed standby or CA is restarted after a seeded pause);
failing over a lost primary is the watch agent's job, never the harness's.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dbops import local
from devstack.pg import PgCluster, PgError, PgServer
from tests.chaos.places import Places
from tests.helpers import ROOT, CAProcess, start_ca, stopped_at_failpoint, wait_for

KINDS = ("kill-primary", "kill-standby", "kill-both-standbys", "stall-primary", "stall-standby", "kill-ca",
         "kill-ca-after-commit", "kill-watch", "kill-watch-mid-failover", "cut-primary", "cut-standby",
         "disk-full-standby")
# Two at once: only pairs whose targets are disjoint (a primary fault with a standby or CA fault).
PAIRS = (("kill-primary", "stall-standby"), ("kill-primary", "kill-ca"), ("stall-primary", "kill-ca"),
         ("kill-standby", "kill-ca"), ("stall-standby", "kill-ca"), ("kill-primary", "kill-standby"),
         ("stall-primary", "stall-standby"), ("cut-primary", "stall-standby"), ("cut-standby", "kill-ca"),
         ("kill-primary", "disk-full-standby"), ("disk-full-standby", "kill-ca"))
# Where the CA is frozen, then killed: after the commit of one of these calls, before its reply.
AFTER_COMMIT = ("CreateOrganization", "RequestIntermediateCsr", "UploadIntermediateCertificate", "UpdatePolicy",
                "RevokeIntermediate", "GetKeyPair")
# Where the watch agent is frozen, then killed: between two steps of its failover (dbops.failover).
FAILOVER_STEPS = ("fenced", "promoted", "configured", "repointed")


def _starttime(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _tree(pid: int) -> list[int]:
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [int(k) for k in kids]


@dataclass
class Watcher:
    """`python -m control_plane db --cluster SPEC watch --after N`, as `make up` runs it."""

    cluster: PgCluster
    log: Path
    state: Path
    after: float
    proc: subprocess.Popen[bytes] | None = None

    def start(self, failpoints: str = "") -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARD_")}
        if failpoints:
            env["KEYWARD_FAILPOINTS"] = failpoints
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "control_plane", "db", "--cluster", str(self.cluster.spec_path), "watch",
                 "--after", str(self.after), "--state", str(self.state)], cwd=ROOT, env=env, stdout=out,
                stderr=out)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@dataclass
class CA:
    """The CA, restartable on the same ports and spool file (a supervisor's restart)."""

    cluster: PgCluster
    pki_dir: Path
    master_file: Path
    workdir: Path
    overrides: dict[str, str]
    proc: CAProcess | None = None

    def start(self, failpoints: str = "") -> None:
        extra = {"KEYWARD_FAILPOINTS": failpoints} if failpoints else {}
        self.proc = start_ca(self.cluster, self.pki_dir, self.master_file, self.workdir, **self.overrides, **extra)

    @property
    def addr(self) -> str:
        return self.overrides["KEYWARD_CA_LISTEN"]

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.proc.kill()
        self.proc.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


@dataclass
class Fault:
    kind: str
    target: str = ""
    param: float = 0.0
    """Stall length, or pause before a restart, or (kill-ca, kill-watch) delay before the kill."""
    param2: float = 0.0
    point: str = ""
    """kill-ca-after-commit: the call; kill-watch-mid-failover: the step (a failpoint)."""
    injected: float = 0.0
    healed: float = 0.0
    quorum_lost: list[tuple[float, float]] = field(default_factory=list)
    """Windows in which a synchronous standby could not confirm (no write may be acknowledged)."""
    ca_down: list[tuple[float, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str = ""

    def describe(self) -> str:
        p = {"stall-primary": "stopped {:.1f}s", "stall-standby": "stopped {:.1f}s",
             "kill-standby": "restarted after {:.1f}s", "kill-both-standbys": "restarted after {:.1f}s",
             "kill-ca": "killed {:.1f}s into the load", "kill-watch": "watcher killed {:.1f}s after the primary",
             "kill-primary": "", "kill-ca-after-commit": "", "kill-watch-mid-failover": "",
             "cut-primary": "link down {:.1f}s", "cut-standby": "link down {:.1f}s",
             "disk-full-standby": "full {:.1f}s"}[self.kind]
        at = f"; at {self.point}" if self.point else ""
        what = "; ".join(x for x in (self.target, p.format(self.param) if p else "", at[2:]) if x)
        return f"{self.kind}({what})"


def choose(rng: random.Random, stall: tuple[float, float], pair_chance: float = 0.15,
           only: tuple[str, ...] = KINDS) -> list[str]:
    """One fault, or (``pair_chance``) two at once; only of the kinds in ``only``."""
    pairs = [p for p in PAIRS if set(p) <= set(only)]
    if pairs and rng.random() < pair_chance:
        return list(rng.choice(pairs))
    return [rng.choice(only)]


def plan(rng: random.Random, kinds: list[str], cluster: PgCluster, stall: tuple[float, float]) -> list[Fault]:
    primary = cluster.primary().name
    standbys = [n.name for n in cluster.nodes if n.name != primary]
    rng.shuffle(standbys)
    out = []
    for k in kinds:
        f = Fault(k)
        if k in ("kill-primary", "stall-primary", "kill-watch", "kill-watch-mid-failover", "cut-primary"):
            f.target = primary
        elif k in ("kill-standby", "stall-standby", "cut-standby", "disk-full-standby"):
            f.target = standbys.pop()
        elif k == "kill-both-standbys":
            f.target = ",".join(standbys)
        if k.startswith(("stall", "cut", "disk-full")):
            f.param = round(rng.uniform(*stall), 1)
        elif k in ("kill-standby", "kill-both-standbys"):
            f.param = round(rng.uniform(0.5, 5.0), 1)
        elif k == "kill-ca":
            f.param, f.param2 = round(rng.uniform(0.0, 2.0), 2), round(rng.uniform(0.3, 3.0), 1)
        elif k == "kill-watch":
            f.param, f.param2 = round(rng.uniform(0.0, 1.2), 2), round(rng.uniform(0.5, 3.0), 1)  # a failover takes ~0.5-1.5 s
        elif k == "kill-ca-after-commit":
            f.point, f.param2 = f"ca.reply.{rng.choice(AFTER_COMMIT)}", round(rng.uniform(0.3, 3.0), 1)
        elif k == "kill-watch-mid-failover":
            f.point, f.param2 = f"dbops.failover.{rng.choice(FAILOVER_STEPS)}", round(rng.uniform(0.5, 3.0), 1)
        out.append(f)
    return out


def supervise(node: PgServer, timeout: float = 60) -> str:
    """Restart a stopped server as a supervisor would (systemd's Restart=always, every second):
    until it runs, whoever started it (the watcher may be rejoining it: then a start fails)."""
    tries = 0
    deadline = time.monotonic() + timeout
    while not node.running():
        if time.monotonic() > deadline:
            raise PgError(f"{node.name} not running {timeout:g}s after the supervisor's first restart ({tries} tries)")
        tries += 1
        try:
            node.start()
        except PgError:
            time.sleep(1.0)  # a supervisor's restart interval
    return f"{node.name} running after {tries} start(s)"


def _node(cluster: PgCluster, name: str) -> PgServer:
    return next(n for n in cluster.nodes if n.name == name)


def _index(name: str) -> int:
    return int(name.lstrip("n"))  # the servers are n0, n1, n2 (devstack.pg.PgCluster)


def run(f: Fault, cluster: PgCluster, ca: CA, watcher: Watcher, places: Places,
        on_ca_back: Callable[[], None]) -> None:
    """Inject ``f`` and heal it (blocking: call it in a thread)."""
    spec = cluster.spec()
    try:
        if f.kind == "kill-primary":
            local.kill_node(spec.node(f.target))
            f.injected = time.monotonic()  # every process of the primary gone (it served until then)
        elif f.kind in ("kill-standby", "kill-both-standbys"):
            names = f.target.split(",")
            f.injected = time.monotonic()
            for name in names:
                local.kill_node(spec.node(name))
            time.sleep(f.param)
            for i, name in enumerate(names):
                if i == len(names) - 1:  # from here on every standby may confirm again (before pg_ctl returns)
                    f.quorum_lost.append((f.injected, time.monotonic()))
                f.notes.append(supervise(_node(cluster, name)))
        elif f.kind in ("stall-primary", "stall-standby"):
            pid = _node(cluster, f.target).pid()
            assert pid is not None, f"{f.target} is not running"
            os.kill(pid, signal.SIGSTOP)  # the postmaster first: it forks nothing more
            f.injected = time.monotonic()
            pids = {p: _starttime(p) for p in _tree(pid)}
            for p in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGSTOP)
            time.sleep(f.param)
            if f.kind == "stall-standby":
                f.quorum_lost.append((f.injected, time.monotonic()))
            resumed = 0
            for p, st in pids.items():  # only the very processes stopped (a fenced server's are gone)
                if st is not None and _starttime(p) == st:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, signal.SIGCONT)
                        resumed += 1
            f.notes.append(f"SIGCONT to {resumed} of {len(pids)} processes")
        elif f.kind == "kill-ca":
            time.sleep(f.param)
            f.injected = time.monotonic()
            ca.kill()
            time.sleep(f.param2)
            ca.start()
            f.ca_down.append((f.injected, time.monotonic()))
            on_ca_back()
        elif f.kind == "kill-ca-after-commit":
            down = time.monotonic()
            ca.kill()
            ca.start(failpoints=f.point)  # the next such call commits, then the CA freezes before replying
            assert ca.proc is not None
            pid = ca.proc.proc.pid
            wait_for(lambda: stopped_at_failpoint(pid), 120, f"the CA to stop at {f.point}", interval=0.02)
            f.injected = time.monotonic()
            ca.kill()
            time.sleep(f.param2)
            ca.start()
            f.ca_down.append((down, time.monotonic()))
            on_ca_back()
        elif f.kind == "kill-watch-mid-failover":
            watcher.kill()
            watcher.start(failpoints=f.point)  # it reads the primary it last saw from its state file
            local.kill_node(spec.node(f.target))
            f.injected = time.monotonic()
            assert watcher.proc is not None
            wpid = watcher.proc.pid
            try:
                wait_for(lambda: stopped_at_failpoint(wpid), 120, f"the watcher to stop at {f.point}", interval=0.02)
                f.notes.append(f"watcher killed at {f.point}")
            except AssertionError:  # a failover that skips the step (nothing to re-point): killed anyway
                f.notes.append(f"watcher never reached {f.point}; killed")
            watcher.kill()
            time.sleep(f.param2)
            watcher.start()
        elif f.kind in ("cut-primary", "cut-standby"):
            i = _index(f.target)
            places.cut(i)
            f.injected = time.monotonic()
            time.sleep(f.param)
            places.restore(i)
            if f.kind == "cut-standby":
                f.quorum_lost.append((f.injected, time.monotonic()))
        elif f.kind == "disk-full-standby":
            i = _index(f.target)
            taken = places.fill(i)
            f.injected = time.monotonic()
            time.sleep(f.param)
            places.free(i)
            node = _node(cluster, f.target)
            f.notes.append(f"{taken / 2**20:.0f} MiB taken; the server "
                           + ("ran on" if node.running() else "had stopped: restarted (a supervisor's restart)"))
            if not node.running():
                f.notes.append(supervise(node))
        elif f.kind == "kill-watch":
            local.kill_node(spec.node(f.target))
            f.injected = time.monotonic()
            time.sleep(watcher.after + f.param)
            watcher.kill()
            f.notes.append("watcher killed")
            time.sleep(f.param2)
            watcher.start()
        f.healed = time.monotonic()
    except Exception as e:  # noqa: BLE001  (reported by the campaign as the cycle's failure)
        f.error = f"{type(e).__name__}: {e}"
        f.healed = time.monotonic()
