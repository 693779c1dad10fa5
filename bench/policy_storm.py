"""Tenant isolation under a policy storm (issue 10, finding 3), in one run, on
this machine, reported as ratios: the latency another org's ZEN sees from the
CA, quiet vs during a storm of large policy writes by one org admin.

It starts its own throwaway stack in a temporary folder, as the test fixtures
do: three Postgres servers (a primary and two synchronous standbys), dev PKI,
a master secret on /dev/shm, and the CA (``python -m control_plane serve`` on
port 0). Org ``storm`` and org ``victim`` each get an active key; the dev pool
``public`` is registered. Then, as ``zen-public``, it times ``--n`` sequential
GetKeyPair calls for org ``victim`` in two phases:

  quiet  nothing else talks to the CA
  storm  org ``storm``'s admin keeps ``--writers`` (8) UpdatePolicy calls in
         flight, each carrying ``--entries`` (1,000) entries in every list
         (blocked hosts, do-not-inspect hosts, URL prefixes, CIDRs), retrying
         at once whatever the answer (RESOURCE_EXHAUSTED included). The storm
         runs in its own process, so the timing client shares no GIL with it.

Usage:

    .venv/bin/python bench/policy_storm.py [--n 300]

Prints p50/p99/max of each phase, the storm/quiet ratios, the storm's accepted
vs RESOURCE_EXHAUSTED writes, and the CPU used in each phase (% of one core) by
the CA, the Postgres servers, the two clients, and everything else on the
machine ("others": other people's work, i.e. noise in the figures).
Everything it started (Postgres servers, CA, storm process, files) is removed
on exit, Ctrl-C included. Nothing here is a test: speed is never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devstack import pki
from devstack.pg import PgCluster, free_port
from protos.keyward.v1 import keyward_pb2 as pb
from tests.helpers import CAProcess, OrgRoot, clients, start_ca
from tests.integration.flow import activate, create_org, org_admin

STORM, VICTIM = "storm", "victim"
TICK = os.sysconf("SC_CLK_TCK")


def big_policy(n: int) -> pb.Policy:
    """The policy of test_bad_input's storm test: ``n`` entries in each list (1,000 is the per-list cap)."""
    return pb.Policy(blocked_hosts=[f"b{i}.example.com" for i in range(n)],
                     do_not_inspect_hosts=[f"*.bank{i}.example.net" for i in range(n)],
                     blocked_url_prefixes=[f"s{i}.example.org/private/" for i in range(n)],
                     location_cidrs=[f"10.{i // 256}.{i % 256}.0/24" for i in range(n)])


# ------------------------------------------------------------------ the storm (a child process)

def storm_worker(addr: str, pki_dir: Path, writers: int, entries: int) -> None:
    """Keep ``writers`` UpdatePolicy calls in flight until stdin says ``stop`` (or closes).
    Protocol on stdout, one JSON line each: {"ready"} after the first answer, then the
    counts so far on every ``mark`` and on ``stop``."""
    admin = clients(addr, pki_dir, f"org-admin-{STORM}")
    req = pb.UpdatePolicyRequest(org_id=STORM, policy=big_policy(entries))
    lock = threading.Lock()
    counts: dict[str, int] = {}
    ok_lat: list[float] = []
    first, stop = threading.Event(), threading.Event()

    def write() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                admin.admin.UpdatePolicy(req, timeout=60)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            with lock:
                counts[code] = counts.get(code, 0) + 1
                if code == "OK":
                    ok_lat.append(time.perf_counter() - t0)
            first.set()

    def report() -> None:
        with lock:
            out = {"counts": dict(counts), "ok_lat": list(ok_lat)}
        print(json.dumps(out), flush=True)

    threads = [threading.Thread(target=write, daemon=True) for _ in range(writers)]
    for t in threads:
        t.start()
    first.wait(60)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() == "mark":
            report()
        elif line.strip() == "stop":
            break
    stop.set()
    report()
    for t in threads:
        t.join(70)


class Storm:
    def __init__(self, addr: str, pki_dir: Path, writers: int, entries: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--storm-worker", addr, str(pki_dir), str(writers), str(entries)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)

    def wait_ready(self) -> None:
        self._read()  # {"ready": true}: the storm is under way

    def _read(self) -> dict[str, Any]:
        out: IO[str] | None = self.proc.stdout
        assert out is not None
        line = out.readline()
        if not line:
            raise SystemExit(f"storm process exited ({self.proc.wait()})")
        rec: dict[str, Any] = json.loads(line)
        return rec

    def tell(self, what: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return self._read()

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# ------------------------------------------------------------------ measuring

def cpu_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, user + system CPU seconds, all threads) for every process (/proc/PID/stat)."""
    out: dict[int, tuple[int, float]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        out[int(d.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK)
    return out


def tree_cpu(table: dict[int, tuple[int, float]], roots: list[int], *, children: bool = True) -> dict[int, float]:
    """CPU seconds of ``roots`` and, with ``children``, of all their descendants."""
    want = {p for p in roots if p in table}
    grew = children
    while grew:
        more = {p for p, (pp, _) in table.items() if pp in want and p not in want}
        want |= more
        grew = bool(more)
    return {p: table[p][1] for p in want}


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of all cores since boot (/proc/stat: all but idle and iowait)."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    return (sum(v) - v[3] - v[4]) / TICK


class CpuMeter:
    """CPU used during a phase, in % of one core: the CA, the Postgres servers, the storm process,
    this process, and everything else on the machine (other people's work: a sign of noise)."""

    def __init__(self, ca: CAProcess, pg: PgCluster, storm: Storm | None) -> None:
        self.ca = ca
        self.groups: dict[str, tuple[list[int], bool]] = {
            "ca": ([ca.proc.pid], False), "postgres": ([p for n in pg.nodes if (p := n.pid())], True),
            "storm_client": ([storm.proc.pid] if storm else [], False), "bench_client": ([os.getpid()], False)}

    def _sample(self) -> tuple[dict[str, dict[int, float]], float, float]:
        t = cpu_table()
        return ({g: tree_cpu(t, roots, children=ch) for g, (roots, ch) in self.groups.items()},
                machine_cpu_seconds(), time.perf_counter())

    def start(self) -> None:
        self.t0 = self._sample()

    def stop(self) -> dict[str, float]:
        (g0, m0, w0), (g1, m1, w1) = self.t0, self._sample()
        wall = w1 - w0
        out = {g: 100 * sum(v - g0[g].get(p, 0.0) for p, v in g1[g].items()) / wall for g in self.groups}
        out["machine"] = 100 * (m1 - m0) / wall
        out["others"] = max(0.0, out["machine"] - sum(out[g] for g in self.groups))
        return out


def timed_calls(call: Callable[[], object], n: int) -> tuple[list[float], dict[str, int]]:
    lat: list[float] = []
    errors: dict[str, int] = {}
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            call()
        except grpc.RpcError as e:
            errors[e.code().name] = errors.get(e.code().name, 0) + 1
            continue
        lat.append(time.perf_counter() - t0)
    return lat, errors


def summary(lat: list[float]) -> dict[str, float]:
    s = sorted(lat)
    if not s:
        return {"n": 0}
    return {"n": len(s), "p50_ms": statistics.median(s) * 1000,
            "p99_ms": s[min(len(s) - 1, int(len(s) * 0.99))] * 1000, "max_ms": s[-1] * 1000}


def phase(meter: CpuMeter, call: Callable[[], object], n: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    meter.start()
    lat, errors = timed_calls(call, n)
    cpu = meter.stop()
    if meter.ca.proc.poll() is not None:
        raise SystemExit(f"the CA exited ({meter.ca.proc.returncode}) during the phase:\n{meter.ca.log_text()[-3000:]}")
    return {"getkeypair": summary(lat), "errors": errors, "wall_s": time.perf_counter() - t0,
            "cpu_pct_of_one_core": cpu}


# ------------------------------------------------------------------ the run

def run(a: argparse.Namespace, stack: ExitStack) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="keyward-bench-storm-"))
    stack.callback(shutil.rmtree, work, True)
    os.chmod(work, 0o755)  # the postgres user must reach its data directory below
    secret_dir = Path(tempfile.mkdtemp(prefix="keyward-bench-secret-", dir="/dev/shm"))
    stack.callback(shutil.rmtree, secret_dir, True)
    master = secret_dir / "master.key"
    fd = os.open(master, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(os.urandom(48))
    pki_dir = work / "pki"
    pki.init(pki_dir)

    print("starting Postgres (primary + 2 synchronous standbys) and the CA ...", file=sys.stderr)
    pg = PgCluster(work / "pg", (free_port(), free_port(), free_port()))
    stack.callback(pg.destroy)  # before init: a half-initialized cluster is destroyed too
    pg.init()
    ca = start_ca(pg, pki_dir, master, work / "ca")
    stack.callback(ca.stop)

    platform = clients(ca.addr, pki_dir, "platform-admin")
    platform.admin.RegisterZenPool(pb.RegisterZenPoolRequest(
        pool=pb.ZenPool(name="public", visibility=pb.POOL_VISIBILITY_PUBLIC)), timeout=30)
    for org in (STORM, VICTIM):
        create_org(platform, org)
        activate(org_admin(ca.addr, pki_dir, org), OrgRoot.create(work, org), org)

    zen = clients(ca.addr, pki_dir, "zen-public")
    req = pb.GetKeyPairRequest(org_id=VICTIM)

    def get() -> object:
        kp = zen.keys.GetKeyPair(req, timeout=30)
        assert kp.org_id == VICTIM
        return kp

    print(f"quiet: {a.n} GetKeyPair calls for org {VICTIM!r} ...", file=sys.stderr)
    timed_calls(get, a.warmup)
    quiet = phase(CpuMeter(ca, pg, None), get, a.n)

    print(f"storm: {a.writers} concurrent UpdatePolicy calls by org-admin/{STORM} "
          f"({a.entries} entries per list), {a.n} GetKeyPair calls ...", file=sys.stderr)
    storm = Storm(ca.addr, pki_dir, a.writers, a.entries)
    stack.callback(storm.end)
    storm.wait_ready()
    timed_calls(get, a.warmup)
    before = storm.tell("mark")
    stormy = phase(CpuMeter(ca, pg, storm), get, a.n)
    after = storm.tell("stop")
    storm.end()
    counts = {k: v - before["counts"].get(k, 0) for k, v in after["counts"].items()}
    ok_lat = after["ok_lat"][len(before["ok_lat"]):]
    stormy["updatepolicy"] = {
        "accepted": counts.pop("OK", 0), "resource_exhausted": counts.pop("RESOURCE_EXHAUSTED", 0),
        "other": counts, "accepted_per_s": len(ok_lat) / stormy["wall_s"],
        "accepted_latency": summary(ok_lat)}
    return {"quiet": quiet, "storm": stormy}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--storm-worker":
        addr, pki_dir, writers, entries = sys.argv[2:6]
        storm_worker(addr, Path(pki_dir), int(writers), int(entries))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="GetKeyPair calls timed in each phase")
    ap.add_argument("--warmup", type=int, default=20, help="untimed calls before each phase")
    ap.add_argument("--writers", type=int, default=8, help="concurrent UpdatePolicy calls in the storm")
    ap.add_argument("--entries", type=int, default=1000, help="entries in each policy list")
    a = ap.parse_args()

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through the ExitStack: everything is cleaned up
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    stack = ExitStack()
    try:
        r = run(a, stack)
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        # A second Ctrl-C (or a TERM) while cleaning up must not leave servers behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.close()
    print(json.dumps(r, indent=2))
    q, s = r["quiet"]["getkeypair"], r["storm"]["getkeypair"]
    u = r["storm"]["updatepolicy"]
    qc, sc = r["quiet"]["cpu_pct_of_one_core"], r["storm"]["cpu_pct_of_one_core"]
    print(f"GetKeyPair of another org, storm/quiet: p50 x{s['p50_ms'] / q['p50_ms']:.2f} "
          f"({q['p50_ms']:.2f} -> {s['p50_ms']:.2f} ms), p99 x{s['p99_ms'] / q['p99_ms']:.2f} "
          f"({q['p99_ms']:.2f} -> {s['p99_ms']:.2f} ms), max {q['max_ms']:.1f} -> {s['max_ms']:.1f} ms")
    print(f"storm UpdatePolicy: {u['accepted']} accepted, {u['resource_exhausted']} RESOURCE_EXHAUSTED, "
          f"other {u['other'] or 0}; CA CPU {qc['ca']:.0f}% -> {sc['ca']:.0f}% of a core "
          f"(Postgres {qc['postgres']:.0f}% -> {sc['postgres']:.0f}%; "
          f"other processes on the machine {qc['others']:.0f}% -> {sc['others']:.0f}%)")
    errors = {ph: r[ph]["errors"] for ph in ("quiet", "storm") if r[ph]["errors"]}
    if errors:
        print(f"GetKeyPair failures (not in the latencies): {errors}")
    met = s["p99_ms"] < 100 and not errors
    print(f"issue 10 target, p99 < 100 ms during the storm (and no failures): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
