"""GetKeyPair under open-loop load, and a rotation storm (issue 13), in one run on this machine.

It starts its own throwaway stack in a temporary folder, as the test fixtures
do (and bench/policy_storm.py): three Postgres servers (a primary and two
synchronous standbys, remote_apply, ANY 2), dev PKI, a master secret on
/dev/shm, and the CA (``python -m control_plane serve`` on port 0). Org
``load`` and org ``rotating`` each get an active key; the dev pool ``public``
is registered.

load    For each rate of ``--rates`` (100, 300, 1000 req/s), ``--seconds`` (10)
        of GetKeyPair calls for org ``load`` as ``zen-public``, open-loop: call
        i is started at t0 + i/rate whatever the earlier calls are doing (no
        coordinated omission: latency counts from the call's scheduled start,
        so a client that falls behind shows as latency, and the largest such
        lag is printed). The calls come from ``--procs`` (2) client processes
        (gRPC aio, no GIL shared with this one), each with ``--channels`` (16)
        channels of its own (a TCP+TLS connection each), round robin.
storm   500 ZENs of pool ``public`` (``--zens``; each its own certificate,
        hence its own identity document, and its own connection, opened and
        used once before), split over the client processes. Org ``rotating``
        rotates (a new key is requested, signed, uploaded: the old one is
        retired), then every ZEN asks for the new key at once
        (GetKeyPair with min_version = the new version), as after a
        key-rotation event on their WatchKeys streams.

Each call has a 5 s deadline (``--timeout``; the ZEN's). Printed per phase:
p50/p99/max latency of the successful calls, failures by status code, the
CPU used by the CA and by the Postgres servers per call (ms; less sensitive
to a busy machine than latency), audit rows written and the CA's audit
commits (``keyward_ca_audit_commits_total`` when the CA has it), and the CPU
used by other processes on the machine meanwhile ("others": noise). A
markdown table at the end; ``--out FILE`` writes it (and the JSON beside it,
FILE.json). Everything it started is removed on exit, Ctrl-C included.
Nothing here is a test: speed is never asserted.

Usage:

    .venv/bin/python bench/ca_load.py [--rates 100,300,1000] [--seconds 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from protos.keyward.v1 import keyward_pb2 as pb  # noqa: E402
from protos.keyward.v1 import keyward_pb2_grpc as pb_grpc  # noqa: E402

LOAD_ORG, ROTATING_ORG = "load", "rotating"
TICK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ the client (child processes)

def _creds(pki_dir: Path, stem: str) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=(pki_dir / "ca.crt").read_bytes(),
                                        private_key=(pki_dir / f"{stem}.key").read_bytes(),
                                        certificate_chain=(pki_dir / f"{stem}.crt").read_bytes())


async def _client(addr: str, pki_dir: Path, stems: list[str], timeout: float) -> None:
    """One client process: a channel (its own connection) per entry of ``stems``. Commands on
    stdin, one JSON line each; one JSON line answers each on stdout:

    {"cmd": "load", "org", "rate", "seconds", "start", "offset"}: open-loop calls from wall time
        ``start`` + ``offset``, at ``rate`` per second, round robin over the channels;
    {"cmd": "burst", "org", "min_version"}: one call on every channel, all at once.
    """
    opts = [("grpc.use_local_subchannel_pool", 1)]  # distinct connections, even with one certificate
    cache: dict[str, grpc.ChannelCredentials] = {}
    chans = [grpc.aio.secure_channel(addr, cache.setdefault(s, _creds(pki_dir, s)), options=opts) for s in stems]
    stubs = [pb_grpc.KeyDistributionStub(c) for c in chans]

    async def warm(stub: pb_grpc.KeyDistributionStub) -> None:
        await stub.GetCaInfo(pb.GetCaInfoRequest(), timeout=60)

    for i in range(0, len(stubs), 50):  # connect (TLS handshakes), a bounded number at once
        await asyncio.gather(*(warm(s) for s in stubs[i:i + 50]))
    print(json.dumps({"ready": True}), flush=True)
    loop = asyncio.get_running_loop()
    samples: dict[str, str] = {}  # one message per status code, per command

    async def call(stub: pb_grpc.KeyDistributionStub, req: pb.GetKeyPairRequest, t_sched: float,
                   lat: list[float], errors: dict[str, int]) -> None:
        try:
            await stub.GetKeyPair(req, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            errors[e.code().name] = errors.get(e.code().name, 0) + 1
            samples.setdefault(e.code().name, (e.details() or "")[:200])
            return
        lat.append(time.perf_counter() - t_sched)

    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line or line.strip() == "stop":
            break
        cmd = json.loads(line)
        lat: list[float] = []
        errors: dict[str, int] = {}
        samples.clear()
        tasks: list[asyncio.Task[None]] = []
        lag = 0.0
        if cmd["cmd"] == "load":
            req = pb.GetKeyPairRequest(org_id=cmd["org"])
            n = int(cmd["rate"] * cmd["seconds"])
            # Wall time start (shared by the processes), then the monotonic perf counter.
            t0 = time.perf_counter() + (cmd["start"] + cmd["offset"] - time.time())
            i = 0
            while i < n:
                now = time.perf_counter()
                due = t0 + i / cmd["rate"]
                if due > now:
                    await asyncio.sleep(due - now)
                    continue
                while i < n and (due := t0 + i / cmd["rate"]) <= now:  # every call now due
                    lag = max(lag, now - due)
                    tasks.append(asyncio.create_task(call(stubs[i % len(stubs)], req, due, lat, errors)))
                    i += 1
        else:
            req = pb.GetKeyPairRequest(org_id=cmd["org"], min_version=cmd["min_version"])
            t = time.perf_counter()
            tasks = [asyncio.create_task(call(s, req, t, lat, errors)) for s in stubs]
        await asyncio.gather(*tasks)
        print(json.dumps({"lat": lat, "errors": errors, "lag": lag, "samples": samples}), flush=True)
    for c in chans:
        await c.close()


class Client:
    def __init__(self, addr: str, pki_dir: Path, stems: list[str], timeout: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--client", addr, str(pki_dir), str(timeout), ",".join(stems)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)

    def read(self) -> dict[str, Any]:
        out: IO[str] | None = self.proc.stdout
        assert out is not None
        line = out.readline()
        if not line:
            raise SystemExit(f"client process exited ({self.proc.wait()})")
        rec: dict[str, Any] = json.loads(line)
        return rec

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

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


def tree_cpu(table: dict[int, tuple[int, float]], roots: list[int]) -> dict[int, float]:
    """CPU seconds of ``roots`` and all their descendants."""
    want = {p for p in roots if p in table}
    grew = True
    while grew:
        more = {p for p, (pp, _) in table.items() if pp in want and p not in want}
        want |= more
        grew = bool(more)
    return {p: table[p][1] for p in want}


def machine_cpu_seconds() -> float:
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    return (sum(v) - v[3] - v[4]) / TICK


class CpuMeter:
    """CPU seconds used during a phase by the CA (with its validator worker), the Postgres
    servers, the client processes, and everything else on the machine (others: noise)."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups

    def _sample(self) -> tuple[dict[str, dict[int, float]], float, float]:
        t = cpu_table()
        return ({g: tree_cpu(t, roots) for g, roots in self.groups.items()}, machine_cpu_seconds(),
                time.perf_counter())

    def start(self) -> None:
        self.t0 = self._sample()

    def stop(self) -> dict[str, float]:
        (g0, m0, w0), (g1, m1, w1) = self.t0, self._sample()
        out = {g: sum(v - g0[g].get(p, 0.0) for p, v in g1[g].items()) for g in self.groups}
        out["machine"] = m1 - m0
        out["others"] = max(0.0, out["machine"] - sum(out[g] for g in self.groups))
        out["wall"] = w1 - w0
        return out


def audit_commits(metrics_port: int) -> float | None:
    """The CA's count of audit transactions (keyward_ca_audit_commits_total), if it has one."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return None
    m = re.search(r"^keyward_ca_audit_commits_total(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else None


def summary(lat: list[float]) -> dict[str, float]:
    s = sorted(lat)
    if not s:
        return {"n": 0}
    return {"n": len(s), "p50_ms": s[len(s) // 2] * 1000, "p99_ms": s[min(len(s) - 1, int(len(s) * 0.99))] * 1000,
            "max_ms": s[-1] * 1000}


# ------------------------------------------------------------------ the run

def run(a: argparse.Namespace, stack: ExitStack) -> dict[str, Any]:
    from devstack import pki
    from devstack.pg import PgCluster, free_port
    from tests.helpers import OrgRoot, clients, start_ca
    from tests.integration.flow import activate, create_org, org_admin

    work = Path(tempfile.mkdtemp(prefix="keyward-bench-load-"))
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
    zens = [f"zen-{i}" for i in range(a.zens)]
    for z in zens:  # 500 ZENs of pool "public": a certificate each
        pki.client(pki_dir, z, "zen-pool/public")

    print("starting Postgres (primary + 2 synchronous standbys) and the CA ...", file=sys.stderr)
    pg = PgCluster(work / "pg", (free_port(), free_port(), free_port()))
    stack.callback(pg.destroy)  # before init: a half-initialized cluster is destroyed too
    pg.init()
    env = dict(kv.split("=", 1) for kv in a.ca_env)
    ca = start_ca(pg, pki_dir, master, work / "ca", **env)
    if a.keep_log:
        stack.callback(lambda: shutil.copyfile(ca.log, a.keep_log))  # after the CA stopped (LIFO)
    stack.callback(ca.stop)

    platform = clients(ca.addr, pki_dir, "platform-admin")
    platform.admin.RegisterZenPool(pb.RegisterZenPoolRequest(
        pool=pb.ZenPool(name="public", visibility=pb.POOL_VISIBILITY_PUBLIC)), timeout=30)
    roots = {}
    for org in (LOAD_ORG, ROTATING_ORG):
        create_org(platform, org)
        roots[org] = OrgRoot.create(work, org)
        activate(org_admin(ca.addr, pki_dir, org), roots[org], org)

    procs = max(1, a.procs)
    loaders = [Client(ca.addr, pki_dir, ["zen-public"] * a.channels, a.timeout) for _ in range(procs)]
    stormers = [Client(ca.addr, pki_dir, zens[k::procs], a.timeout) for k in range(procs)]
    for c in loaders + stormers:
        stack.callback(c.end)
    for c in loaders + stormers:
        c.read()  # {"ready": true}: connected
    pg_pids = [p for n in pg.nodes if (p := n.pid())]
    meter = CpuMeter({"ca": [ca.proc.pid], "postgres": pg_pids,
                      "clients": [c.proc.pid for c in loaders + stormers], "bench": [os.getpid()]})

    def audit_rows() -> int:
        return int(pg.psql("SELECT coalesce(max(seq), 0) FROM audit_events"))

    def measured(send: Any, cs: list[Client]) -> dict[str, Any]:
        rows0, commits0 = audit_rows(), audit_commits(ca.metrics_port)
        meter.start()
        send()
        res = [c.read() for c in cs]
        cpu = meter.stop()
        if ca.proc.poll() is not None:
            raise SystemExit(f"the CA exited ({ca.proc.returncode}):\n{ca.log_text()[-3000:]}")
        rows1, commits1 = audit_rows(), audit_commits(ca.metrics_port)
        lat = [x for r in res for x in r["lat"]]
        errors: dict[str, int] = {}
        for r in res:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        samples = {k: v for r in res for k, v in r["samples"].items()}
        calls = len(lat) + sum(errors.values())
        return {"calls": calls, "ok": len(lat), "latency": summary(lat), "errors": errors, "error_samples": samples,
                "client_lag_max_ms": max(r["lag"] for r in res) * 1000,
                "cpu_s": cpu, "ca_cpu_ms_per_call": 1000 * cpu["ca"] / max(1, calls),
                "pg_cpu_ms_per_call": 1000 * cpu["postgres"] / max(1, calls),
                "audit_rows": rows1 - rows0,
                "audit_commits": None if commits0 is None or commits1 is None else commits1 - commits0}

    out: dict[str, Any] = {"load": {}, "storm": None}
    # Warm-up: a short run at the lowest rate, not reported.
    warm = {"cmd": "load", "org": LOAD_ORG, "rate": min(a.rates) / procs, "seconds": 2.0}
    for k, c in enumerate(loaders):
        c.send({**warm, "start": time.time() + 0.5, "offset": k / min(a.rates)})
    for c in loaders:
        c.read()
    for rate in a.rates:
        print(f"load: {rate} GetKeyPair/s for {a.seconds:g} s from {procs} processes ...", file=sys.stderr)
        cmd = {"cmd": "load", "org": LOAD_ORG, "rate": rate / procs, "seconds": a.seconds}
        start = time.time() + 0.5

        def send(cmd: dict[str, Any] = cmd, start: float = start, rate: float = rate) -> None:
            for k, c in enumerate(loaders):
                c.send({**cmd, "start": start, "offset": k / rate})
        out["load"][str(rate)] = measured(send, loaders)
        time.sleep(a.pause)

    print(f"storm: org {ROTATING_ORG!r} rotates, then {a.zens} ZENs ask for its new key at once ...",
          file=sys.stderr)
    for attempt in range(10):  # the CA may still be working off an overload
        try:
            _, inter, _ = activate(org_admin(ca.addr, pki_dir, ROTATING_ORG), roots[ROTATING_ORG], ROTATING_ORG)
            break
        except grpc.RpcError as e:
            if attempt == 9 or e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            time.sleep(2)

    def burst() -> None:
        for c in stormers:
            c.send({"cmd": "burst", "org": ROTATING_ORG, "min_version": inter.version})
    out["storm"] = measured(burst, stormers)
    out["storm"]["zens"] = a.zens
    out["storm"]["new_version"] = inter.version
    return out


def table(r: dict[str, Any], label: str) -> str:
    head = ("| phase | calls | ok | p50 ms | p99 ms | max ms | errors | CA CPU ms/call | PG CPU ms/call "
            "| audit rows / commits | client lag max ms | others CPU % |")
    lines = [label, "", head, "|" + "---|" * (head.count("|") - 1)]
    phases = [(f"{k}/s", v) for k, v in r["load"].items()] + [(f"storm ({r['storm']['zens']} ZENs)", r["storm"])]
    for name, p in phases:
        lat = p["latency"]
        err = ", ".join(f"{k} {v}" for k, v in sorted(p["errors"].items())) or "0"
        commits = "n/a" if p["audit_commits"] is None else f"{p['audit_commits']:.0f}"
        others = 100 * p["cpu_s"]["others"] / p["cpu_s"]["wall"]

        def ms(key: str, lat: dict[str, float] = lat) -> str:
            return f"{lat[key]:.1f}" if key in lat else "-"
        lines.append(f"| {name} | {p['calls']} | {p['ok']} | {ms('p50_ms')} | {ms('p99_ms')} | {ms('max_ms')} "
                     f"| {err} | {p['ca_cpu_ms_per_call']:.2f} | {p['pg_cpu_ms_per_call']:.2f} "
                     f"| {p['audit_rows']} / {commits} | {p['client_lag_max_ms']:.1f} | {others:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        addr, pki_dir, timeout, stems = sys.argv[2:6]
        asyncio.run(_client(addr, Path(pki_dir), stems.split(","), float(timeout)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", type=lambda s: [int(x) for x in s.split(",")], default=[100, 300, 1000],
                    help="GetKeyPair calls per second, one phase each (comma-separated)")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each load phase")
    ap.add_argument("--pause", type=float, default=2.0, help="seconds between phases")
    ap.add_argument("--procs", type=int, default=2, help="client processes")
    ap.add_argument("--channels", type=int, default=16, help="channels (connections) per client process, load")
    ap.add_argument("--zens", type=int, default=500, help="ZENs (certificates, connections) in the storm")
    ap.add_argument("--timeout", type=float, default=5.0, help="deadline of each call (s)")
    ap.add_argument("--ca-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment of the CA (e.g. KEYWARD_DB_POOL_SIZE=16); repeatable")
    ap.add_argument("--keep-log", metavar="FILE", help="copy the CA's log here at the end")
    ap.add_argument("--label", default="", help="a line above the table (e.g. which CA)")
    ap.add_argument("--out", help="write the markdown table here (and the JSON to OUT.json)")
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
    label = a.label or f"GetKeyPair, open-loop, {a.seconds:g} s per rate, {a.procs} client processes"
    md = table(r, label)
    top = r["load"].get("1000")
    storm = r["storm"]
    if top is not None:
        met = (not top["errors"] and top["latency"].get("p99_ms", 1e9) < 5.0) and not storm["errors"]
        md += ("\nissue 13 target (1,000/s: p99 < 5 ms, no failure; the storm: no failure): "
               f"{'met' if met else 'NOT met'}\n")
    print(json.dumps(r, indent=2))
    print(md)
    if a.out:
        Path(a.out).write_text(md)
        Path(a.out + ".json").write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
