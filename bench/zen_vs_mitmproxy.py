"""Interception cost, issue 13's table: direct to the origin, the keyward ZEN and mitmproxy (the
peer), side by side in ONE run on this machine, with the goals met or missed. Only ratios count.

One local HTTPS origin (nginx, one worker, HTTP/2 and HTTP/1.1 by ALPN, a wildcard certificate
for bench.test and *.bench.test from the bench's own root, 1 KiB from memory, a 10 MB file from
tmpfs). Both proxies resolve every name under bench.test to it (the ZEN with
KEYWARD_ZEN_RESOLVE=*.bench.test=127.0.0.1, mitmproxy with bench/mitm_resolve.py). Figures:

  new-conn      the bench's asyncio client, 16 connection loops at once, each request on a new
                TLS connection (CONNECT + two handshakes, the leaf from the proxy's cache), HTTP/1.1;
                req/s over a fixed time. CPU per connection: the proxy's utime+stime
                (/proc/<pid>/stat, its process tree) over the window / connections.
  keepalive     the same client, 16 connections opened first, then HTTP/1.1 requests in turn on
                each; req/s, CPU per request.
  first-visit   sequential: each sample a host name under bench.test the proxy has never seen, one
                request on a new connection (the proxy mints a leaf); p50 and p90 ms; CPU per visit.
  download      curl, a 10 MB file, HTTP/1.1 and HTTP/2, several repetitions; MB/s (10^6 bytes/s)
                from the request sent to the last byte (curl's time_total - time_pretransfer), median.
  h2-keepalive  h2load -c 1 -m 10 (one HTTP/2 connection, 10 streams in flight) through a CONNECT
                tunnel in front of each proxy (tests/tunnel.py: h2load cannot use a proxy).
  memory        the proxy's RSS (VmRSS of its main process): per 10,000 idle intercepted
                connections (N opened, one request each, left idle: delta / N x 10,000) and per
                1,000 cached leaf certificates (M new host names visited: delta / M x 1,000).

Usage (needs the local stack: it starts it if needed; root for nginx's and the fd limits):

    apt-get install -y nginx nghttp2-client
    python3 -m venv /tmp/benchvenv && /tmp/benchvenv/bin/pip install mitmproxy==11.0.2
    .venv/bin/python bench/zen_vs_mitmproxy.py --mitmdump /tmp/benchvenv/bin/mitmdump [--quick] [--out FILE]

Prints the table as markdown (and writes it to --out, raw figures beside it as .json). Nothing
here is a test: speed is never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import secrets
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devstack import pki, stack  # noqa: E402
from keylib import proxyauth  # noqa: E402

DOMAIN = "bench.test"
SIZE = 1024
PATH = f"/big?bytes={SIZE}"  # nginx ignores the query
BIG = 10_000_000
BIG_PATH = "/10m.bin"
LOOPS = 16
TIMEOUT = 30.0
TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sizes:
    seconds: float  # measured window per throughput shape and target
    warmup: float  # the same shape before it, not measured
    first_visits: int
    downloads: int  # curl runs per protocol and target
    h2_n: int  # h2load requests per target
    leaves: int  # new host names visited for the leaf-cache memory figure
    idle: int  # idle intercepted connections for the memory figure


DEFAULT = Sizes(seconds=5, warmup=1, first_visits=100, downloads=15, h2_n=5000, leaves=1000, idle=1000)
QUICK = Sizes(seconds=1.5, warmup=0.5, first_visits=20, downloads=3, h2_n=1000, leaves=200, idle=300)

NGINX_CONF = """\
daemon off;
worker_processes 1;
worker_rlimit_nofile {nofile};
{user}
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections {conns}; }}
http {{
    access_log off;
    client_body_temp_path {d}/nginx-tmp/body;
    proxy_temp_path {d}/nginx-tmp/proxy;
    fastcgi_temp_path {d}/nginx-tmp/fastcgi;
    uwsgi_temp_path {d}/nginx-tmp/uwsgi;
    scgi_temp_path {d}/nginx-tmp/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {d}/site.crt;
        ssl_certificate_key {d}/site.key;
        location = /big {{
            default_type application/octet-stream;
            return 200 "{body}";
        }}
        location = {big_path} {{
            root {d};
            default_type application/octet-stream;
        }}
    }}
}}
"""


class BenchError(Exception):
    """A request the bench could not complete (the message says where)."""


# -- processes: CPU (utime+stime of a process tree) and RSS, from /proc -----------------------------


def _stat_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2:].split()  # from field 3 (state) on: comm may hold spaces


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                kids.setdefault(int(_stat_fields(int(d))[1]), []).append(int(d))
    return kids


def tree_cpu(pid: int, kids: dict[int, list[int]]) -> float:
    """utime+stime, in seconds, of ``pid`` (all its threads) and its live descendants."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError, IndexError, ValueError):
            f = _stat_fields(p)
            total += (int(f[11]) + int(f[12])) / TICK
        todo.extend(kids.get(p, ()))
    return total


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for {pid}")


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(v) - v[3] - v[4]) / TICK  # minus idle and iowait


@dataclass
class Probes:
    """The processes of the run, sampled together: each proxy's tree, nginx's, this process."""

    pids: dict[str, int]

    def sample(self) -> dict[str, float]:
        kids = _children()
        out = {name: tree_cpu(pid, kids) for name, pid in self.pids.items()}
        out["self"] = tree_cpu(os.getpid(), {})  # not its children: curl, nginx, the proxies are counted apart
        out["machine"] = machine_busy()
        return out

    @staticmethod
    def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        d = {k: b[k] - a[k] for k in a}
        d["others"] = max(0.0, d["machine"] - sum(v for k, v in d.items() if k != "machine"))
        return d


# -- the client --------------------------------------------------------------------------------------


@dataclass
class Target:
    key: str  # direct | zen | mitm
    title: str
    cafile: str
    origin_port: int
    proxy_port: int | None = None
    auth: str | None = None
    pid: int = 0  # the process whose CPU and RSS are the figures (nginx's master for direct)

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.cafile)
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    async def connect(self, ctx: ssl.SSLContext, host: str = DOMAIN
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A verified TLS connection to ``host`` at the origin: straight, or through a CONNECT tunnel
        of the proxy (which intercepts it)."""
        async with asyncio.timeout(TIMEOUT):
            if self.proxy_port is None:
                return await asyncio.open_connection("127.0.0.1", self.origin_port, ssl=ctx, server_hostname=host)
            r, w = await asyncio.open_connection("127.0.0.1", self.proxy_port)
            try:
                auth = f"Proxy-Authorization: {self.auth}\r\n" if self.auth else ""
                w.write(f"CONNECT {host}:{self.origin_port} HTTP/1.1\r\nHost: {host}:{self.origin_port}\r\n"
                        f"{auth}\r\n".encode())
                head = await r.readuntil(b"\r\n\r\n")
                if head.split(b" ", 2)[1:2] != [b"200"]:
                    status = head.split(b"\r\n", 1)[0]
                    raise BenchError(f"{self.title}: CONNECT {host}: {status!r}")
                await w.start_tls(ctx, server_hostname=host)
            except BaseException:
                w.close()
                raise
            return r, w


async def get(r: asyncio.StreamReader, w: asyncio.StreamWriter, host: str = DOMAIN) -> None:
    """One HTTP/1.1 GET of the 1 KiB answer, read to its end."""
    async with asyncio.timeout(TIMEOUT):
        w.write(f"GET {PATH} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: keyward-bench\r\n\r\n".encode())
        head = await r.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next((int(v) for k, _, v in (ln.partition(b":") for ln in lines[1:])
                       if k.strip().lower() == b"content-length"), None)
        if lines[0].split(b" ", 2)[1:2] != [b"200"] or length != SIZE:
            raise BenchError(f"{host}: unexpected answer {lines[0]!r}, length {length}")
        await r.readexactly(length)


async def close(w: asyncio.StreamWriter) -> None:
    w.close()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(5):
            await w.wait_closed()


FAILURES = (OSError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, BenchError)


@dataclass
class Window:
    """One measured window of a shape for one target."""

    done: int = 0
    seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    def cpu_per_ms(self, who: str) -> float:
        return self.cpu[who] / self.done * 1000 if self.done else float("nan")


async def _new_conn_once(t: Target, ctx: ssl.SSLContext, host: str = DOMAIN) -> None:
    r, w = await t.connect(ctx, host)
    try:
        await get(r, w, host)
    finally:
        await close(w)


async def throughput(t: Target, keepalive: bool, seconds: float, probes: Probes | None) -> Window:
    """``LOOPS`` loops at once for ``seconds``: each a request on a new connection (new-conn), or
    requests in turn on its own connection opened before the window (keepalive)."""
    ctx, win = t.context(), Window()
    conns = await asyncio.gather(*(t.connect(ctx) for _ in range(LOOPS))) if keepalive else []

    async def loop(i: int, end: float) -> None:
        while time.monotonic() < end:
            try:
                if keepalive:
                    await get(*conns[i])
                else:
                    await _new_conn_once(t, ctx)
                win.done += 1
            except FAILURES as e:
                win.errors.append(f"{type(e).__name__}: {e}")
                await asyncio.sleep(0.1)
                if keepalive:
                    with contextlib.suppress(*FAILURES):
                        conns[i] = await t.connect(ctx)

    before = probes.sample() if probes else {}
    start = time.monotonic()
    await asyncio.gather(*(loop(i, start + seconds) for i in range(LOOPS)))
    win.seconds = time.monotonic() - start
    if probes:
        win.cpu = Probes.delta(before, probes.sample())
    await asyncio.gather(*(close(w) for _, w in conns))
    return win


async def first_visits(t: Target, hosts: list[str], probes: Probes) -> Window:
    """Sequential: one request on a new connection per host name, each never seen before."""
    ctx, win = t.context(), Window()
    before = probes.sample()
    start = time.monotonic()
    for host in hosts:
        t0 = time.perf_counter()
        try:
            r, w = await t.connect(ctx, host)
            try:
                await get(r, w, host)
                win.latencies_ms.append((time.perf_counter() - t0) * 1000)  # the close not included
            finally:
                await close(w)
        except FAILURES as e:
            win.errors.append(f"{host}: {type(e).__name__}: {e}")
            continue
        win.done += 1
    win.seconds = time.monotonic() - start
    win.cpu = Probes.delta(before, probes.sample())
    return win


async def _each(items: list[str], work: Callable[[str], Awaitable[None]]) -> list[str]:
    """``work`` on every item, ``LOOPS`` at a time; the failures."""
    queue, errors = list(reversed(items)), []

    async def worker() -> None:
        while queue:
            item = queue.pop()
            try:
                await work(item)
            except FAILURES as e:
                errors.append(f"{item}: {type(e).__name__}: {e}")

    await asyncio.gather(*(worker() for _ in range(LOOPS)))
    return errors


async def leaf_memory(t: Target, hosts: list[str], warm: list[str]) -> dict[str, Any]:
    """RSS before and after visiting every host of ``hosts`` (new to the proxy), 16 at a time;
    ``warm`` (new too) visited first, not counted: the minting path's own allocations are made."""
    ctx = t.context()
    await _each(warm, lambda h: _new_conn_once(t, ctx, h))
    await asyncio.sleep(1)
    before = rss_bytes(t.pid)
    errors = await _each(hosts, lambda h: _new_conn_once(t, ctx, h))
    await asyncio.sleep(1)
    after = rss_bytes(t.pid)
    n = len(hosts) - len(errors)
    return {"n": n, "rss_before": before, "rss_after": after, "errors": errors,
            "per_1000_mb": (after - before) / n * 1000 / 1e6 if n else float("nan")}


async def idle_memory(t: Target, n: int) -> dict[str, Any]:
    """RSS before and after opening ``n`` intercepted connections (one request each, 16 at a
    time), left idle; then closed. Connections the proxy closed before the reading are counted."""
    ctx = t.context()
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def open_one(_: str) -> None:
        r, w = await t.connect(ctx)
        try:
            await get(r, w)
        except BaseException:
            await close(w)
            raise
        conns.append((r, w))

    await asyncio.sleep(1)
    before = rss_bytes(t.pid)
    start = time.monotonic()
    errors = await _each([str(i) for i in range(n)], open_one)
    opened_in = time.monotonic() - start
    await asyncio.sleep(1)
    after = rss_bytes(t.pid)
    gone = sum(1 for r, _ in conns if r.at_eof())
    await asyncio.gather(*(close(w) for _, w in conns))
    ok = len(conns) - gone
    return {"n": ok, "rss_before": before, "rss_after": after, "errors": errors, "closed_early": gone,
            "opened_in_s": opened_in, "per_10000_mb": (after - before) / ok * 10000 / 1e6 if ok else float("nan")}


# -- curl and h2load ---------------------------------------------------------------------------------


def curl_download(t: Target, proto: str, secret: str) -> float:
    """MB/s of one 10 MB download with curl (``proto``: 1.1 or 2)."""
    url = f"https://{DOMAIN}:{t.origin_port}{BIG_PATH}"
    via = (["--proxy", f"http://127.0.0.1:{t.proxy_port}"] if t.proxy_port else
           ["--resolve", f"{DOMAIN}:{t.origin_port}:127.0.0.1"])
    if t.key == "zen":
        via += ["--proxy-user", f"bench:{secret}"]
    r = subprocess.run(["curl", "-sS", "--max-time", "120", "-o", "/dev/null", "--cacert", t.cafile, *via,
                        "--http1.1" if proto == "1.1" else "--http2",
                        "-w", "%{http_code} %{size_download} %{time_pretransfer} %{time_total} %{http_version}",
                        url], capture_output=True, text=True, timeout=150)
    parts = r.stdout.split()
    if r.returncode or len(parts) != 5 or parts[0] != "200" or int(parts[1]) != BIG or parts[4] != proto:
        raise BenchError(f"{t.title}: curl --http{proto} {url}: {r.returncode} {r.stdout!r} {r.stderr.strip()!r}")
    return BIG / (float(parts[3]) - float(parts[2])) / 1e6


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def h2load(port: int, n: int, streams: int = 10) -> dict[str, float]:
    """h2load, one connection, ``streams`` in flight, to https://bench.test/ connected to
    127.0.0.1:``port`` (a tunnel, or the origin itself): SNI and :authority are bench.test. Every
    request must succeed with a 2xx, over h2."""
    cmd = ["h2load", "-n", str(n), "-c", "1", "-m", str(streams), f"--connect-to=127.0.0.1:{port}",
           f"https://{DOMAIN}{PATH}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    done = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
                     r"(\d+) errored, (\d+) timeout", out)
    codes = re.search(r"status codes: (\d+) 2xx", out)
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)\s", out)
    proto = re.search(r"Application protocol: (\S+)", out)
    if r.returncode or not (done and codes and rps and mean and proto):
        raise BenchError(f"h2load failed ({r.returncode}):\n{out}")
    succeeded, failed, errored, timeout = (int(done[i]) for i in (2, 3, 4, 5))
    if proto[1] != "h2" or succeeded != n or failed or errored or timeout or int(codes[1]) != n:
        raise BenchError(f"h2load: not every request succeeded over h2 with a 2xx:\n{out}")
    return {"rps": float(rps[1]), "mean_ms": float(mean[1]) * _UNIT[mean[2]], "n": n}


# -- the origin and the proxies ----------------------------------------------------------------------


def start_nginx(d: Path, conns: int) -> tuple[int, subprocess.Popen[bytes]]:
    """nginx for bench.test and *.bench.test (a certificate from the bench's own root, d/root.crt),
    a child process with its own config in ``d``; the 10 MB file in ``d`` (tmpfs if /dev/shm)."""
    ca, ca_key = pki.build_cert(subject_cn="bench web root", issuer=None, issuer_key=None, is_ca=True)
    pki.write_identity(d, "root", ca, ca_key)
    site, key = pki.build_cert(subject_cn=DOMAIN, issuer=ca, issuer_key=ca_key, server=True,
                               dns=[DOMAIN, f"*.{DOMAIN}"])
    pki.write_identity(d, "site", site, key)
    (d / BIG_PATH.lstrip("/")).write_bytes(os.urandom(BIG))
    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                           if os.access(p, os.X_OK)), None)
    if not nginx:
        raise SystemExit("nginx not found: apt-get install -y nginx")
    (d / "nginx-tmp").mkdir()
    port = free_port()
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(d=d, port=port, body="x" * SIZE, big_path=BIG_PATH, conns=conns,
                                      nofile=2 * conns, user="user root;" if os.geteuid() == 0 else ""))
    proc = subprocess.Popen([nginx, "-p", str(d), "-c", str(conf), "-e", str(d / "nginx-error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc=proc)
    except SystemExit:
        proc.kill()
        raise SystemExit("nginx did not start: " + (d / "nginx-error.log").read_text(errors="replace")[-2000:]) from None
    return port, proc


def wait_port(port: int, timeout: float = 30, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listening on {port}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_fd_limit(want: int) -> int:
    """The soft (and if need be hard) limit on open files raised to ``want`` for this process and
    its children (proxies, nginx); what it is now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))  # a hard limit up: root only
        return want
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Children terminated (then killed) on the way out, whatever happens."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


# -- the table ---------------------------------------------------------------------------------------


def _n(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _x(v: float) -> str:
    return f"x{v:.2f}" if v < 10 else f"x{v:.1f}"


def _goal(ok: bool, ratio: str) -> str:
    return f"met ({ratio})" if ok else f"**missed** ({ratio})"


def _errs(w: Window) -> str:
    return f" ({len(w.errors)} failed)" if w.errors else ""


def table(res: dict[str, Any], s: Sizes) -> list[str]:
    nc, ka, fv = res["new-conn"], res["keepalive"], res["first-visit"]
    d, z, m = "direct", "zen", "mitm"
    rows = ["| figure | direct to origin | keyward ZEN | mitmproxy | goal | met? |", "|---|---|---|---|---|---|"]

    def rps_row(title: str, w: dict[str, Window], goal: str, verdict: str, zen_extra: str = "") -> None:
        rows.append(f"| {title} | {_n(w[d].rps)} req/s{_errs(w[d])} | {_n(w[z].rps)} req/s "
                    f"({_x(w[z].rps / w[d].rps)} of direct{zen_extra}){_errs(w[z])} | {_n(w[m].rps)} req/s "
                    f"({_x(w[m].rps / w[d].rps)} of direct){_errs(w[m])} | {goal} | {verdict} |")

    r = nc[z].rps / nc[d].rps
    rps_row(f"new TLS connection per request (asyncio client, {LOOPS} connections at once, HTTP/1.1)", nc,
            "ZEN ≥ 0.5 of direct", _goal(r >= 0.5, _x(r)))
    zc, mc, nginx_c = nc[z].cpu_per_ms(z), nc[m].cpu_per_ms(m), nc[d].cpu_per_ms(d)
    rows.append(f"| CPU per new connection (the proxy's utime+stime / connections, during the row above) "
                f"| {nginx_c:.2f} ms (nginx) | {zc:.2f} ms | {mc:.2f} ms | ZEN ≤ 1.0 ms | "
                f"{_goal(zc <= 1.0, f'{zc:.2f} ms')} |")
    r = ka[z].rps / ka[m].rps
    rps_row(f"keep-alive ({LOOPS} connections, HTTP/1.1)", ka, "ZEN ≥ 15× mitmproxy", _goal(r >= 15, _x(r)),
            f", {_x(r)} of mitmproxy")
    rows.append(f"| CPU per keep-alive request | {ka[d].cpu_per_ms(d):.3f} ms (nginx) | {ka[z].cpu_per_ms(z):.3f} ms "
                f"| {ka[m].cpu_per_ms(m):.3f} ms | | |")
    p = {k: (statistics.median(w.latencies_ms), _pct(w.latencies_ms, 0.9)) for k, w in fv.items()}
    r = p[z][0] / p[d][0]
    rows.append(f"| first visit to an unseen host, sequential, p50 (p90), {s.first_visits} hosts "
                f"| {p[d][0]:.2f} ms ({p[d][1]:.2f}){_errs(fv[d])} "
                f"| {p[z][0]:.2f} ms ({p[z][1]:.2f}) ({_x(r)} of direct){_errs(fv[z])} "
                f"| {p[m][0]:.2f} ms ({p[m][1]:.2f}) ({_x(p[m][0] / p[d][0])} of direct){_errs(fv[m])} "
                f"| ZEN p50 ≤ 2× direct | {_goal(r <= 2, _x(r))} |")
    rows.append(f"| CPU per first visit (leaf minted; signer process included) | {fv[d].cpu_per_ms(d):.2f} ms (nginx) "
                f"| {fv[z].cpu_per_ms(z):.2f} ms | {fv[m].cpu_per_ms(m):.2f} ms | | |")
    for proto in ("1.1", "2"):
        dl = {k: statistics.median(v) for k, v in res["download"][proto].items()}
        r = dl[z] / dl[d]
        rows.append(f"| 10 MB download (curl --http{proto}), median of {s.downloads} | {_n(dl[d])} MB/s "
                    f"| {_n(dl[z])} MB/s ({_x(r)} of direct) | {_n(dl[m])} MB/s ({_x(dl[m] / dl[d])} of direct) "
                    f"| ZEN ≥ 0.8 of direct | {_goal(r >= 0.8, _x(r))} |")
    h2 = res["h2-keepalive"]
    rows.append(f"| h2-keepalive (h2load, 1 connection, 10 streams, {s.h2_n} requests) | {_n(h2[d]['rps'])} req/s "
                f"| {_n(h2[z]['rps'])} req/s ({_x(h2[z]['rps'] / h2[d]['rps'])} of direct, "
                f"{_x(h2[z]['rps'] / h2[m]['rps'])} of mitmproxy) "
                f"| {_n(h2[m]['rps'])} req/s ({_x(h2[m]['rps'] / h2[d]['rps'])} of direct) | | |")
    idle, leaves = res["idle-memory"], res["leaf-memory"]
    rows.append(f"| RSS per 10,000 idle intercepted connections ({idle[z]['n']} and {idle[m]['n']} opened) | — "
                f"| {_n(idle[z]['per_10000_mb'])} MB | {_n(idle[m]['per_10000_mb'])} MB | | |")
    rows.append(f"| RSS per 1,000 cached leaf certificates ({leaves[z]['n']} new hosts) | — "
                f"| {_n(leaves[z]['per_1000_mb'])} MB | — (keeps at most 100: CertStore.STORE_CAP) | | |")
    return rows


def _pct(v: list[float], q: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, int(len(s) * q))] if s else float("nan")


def machine() -> str:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor() or "?")
    return f"`{socket.gethostname()}`, {model}, {os.cpu_count()} cores, Linux {platform.release()}"


def versions(mitmdump: str) -> str:
    def first(cmd: list[str], pat: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            hit = re.search(pat, r.stdout + r.stderr)
            if hit:
                return hit[1]
        return "?"

    mitm, mitm_ssl = first([mitmdump, "--version"], r"Mitmproxy: (\S+)"), first([mitmdump, "--version"],
                                                                                  r"OpenSSL:\s+(OpenSSL \S+)")
    nginx, curl, h2 = (first(["nginx", "-v"], r"nginx/(\S+)"), first(["curl", "-V"], r"curl (\S+)"),
                       first(["h2load", "--version"], r"nghttp2/(\S+)"))
    return (f"Python {platform.python_version()} ({ssl.OPENSSL_VERSION}) for the ZEN and the client; "
            f"mitmproxy {mitm} ({mitm_ssl}, default options, -q); nginx {nginx} (1 worker); curl {curl}; "
            f"h2load {h2}")


# -- the run -----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mitmdump", default="/tmp/benchvenv/bin/mitmdump")
    ap.add_argument("--quick", action="store_true", help=f"smaller sizes, to check the harness: {QUICK}")
    ap.add_argument("--seconds", type=float, help="measured window per throughput shape and target")
    ap.add_argument("--first-visits", type=int, help="new host names, sequential, per target")
    ap.add_argument("--downloads", type=int, help="curl runs per protocol and target")
    ap.add_argument("--h2-n", type=int, help="h2load requests per target")
    ap.add_argument("--leaves", type=int, help="new host names for the leaf-cache memory figure")
    ap.add_argument("--idle", type=int, help="idle intercepted connections for the memory figure")
    ap.add_argument("--out", help="the markdown table goes there too (and the raw figures to the same name "
                    ".json); default /tmp/zen_vs_mitmproxy-<time>.md")
    ap.add_argument("--zen-stderr", help="file for the ZEN's stderr (its logs, access log included); "
                    "default /dev/null")
    a = ap.parse_args()
    base = QUICK if a.quick else DEFAULT
    s = Sizes(**{k: v if getattr(a, k, None) is None else getattr(a, k) for k, v in asdict(base).items()})
    for tool, pkg in (("h2load", "nghttp2-client"), ("curl", "curl")):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found: apt-get install -y {pkg}")
    if not os.access(a.mitmdump, os.X_OK):
        raise SystemExit(f"{a.mitmdump}: not found (python3 -m venv /tmp/benchvenv && "
                         "/tmp/benchvenv/bin/pip install mitmproxy==11.0.2)")
    fds = raise_fd_limit(4 * s.idle + 4096)
    if fds < 4 * s.idle + 1024:
        raise SystemExit(f"open-file limit {fds}: too low for --idle {s.idle} (run as root, or a smaller --idle)")
    started = dt.datetime.now(dt.UTC)
    load = os.getloadavg()

    stack.up()
    from devstack import demo

    policy = {"fail_mode": "FAIL_MODE_OPEN", "proxy_credential_verifiers": [proxyauth.make(demo.PROXY_SECRET)]}
    demo.ensure_org("bench", policy)
    demo.call("org-admin-bench", "keyward.v1.Admin/UpdatePolicy", {"org_id": "bench", "policy": policy})
    demo.activate("bench", "org-admin-bench")
    org_root = str(demo.DEMO / "bench-root" / "root.crt")
    shm = Path("/dev/shm")
    work = Path(tempfile.mkdtemp(prefix="keyward-bench-", dir=shm if shm.is_dir() else None))
    token = secrets.token_hex(3)
    try:
        with processes() as procs:
            oport, nginx = start_nginx(work, s.idle + 2048)
            procs.append(nginx)
            zport, mport = free_port(), free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARD_ZEN")}
            env.update(KEYWARD_ZEN_LISTEN=f"127.0.0.1:{zport}", KEYWARD_ZEN_METRICS_LISTEN="",
                       KEYWARD_CA_ADDR=stack.CA_ADDR, KEYWARD_ZEN_TLS_CERT_FILE=str(demo.PKI / "zen-public.crt"),
                       KEYWARD_ZEN_TLS_KEY_FILE=str(demo.PKI / "zen-public.key"),
                       KEYWARD_ZEN_CA_TRUST_FILE=str(demo.PKI / "ca.crt"),
                       KEYWARD_MASTER_SECRET_FILE=str(stack.secret_dir() / "master.key"),
                       KEYWARD_ZEN_EXTRA_ROOTS_FILE=str(work / "root.crt"),
                       KEYWARD_ZEN_RESOLVE=f"*.{DOMAIN}=127.0.0.1",
                       # every leaf of the run stays cached (the memory figure counts them)
                       KEYWARD_ZEN_LEAF_CACHE=str(2 * (s.leaves + 3 * s.first_visits) + 1000))
            with contextlib.ExitStack() as files:
                zen_err: Any = (files.enter_context(open(a.zen_stderr, "wb")) if a.zen_stderr  # noqa: SIM115
                                else subprocess.DEVNULL)
                procs.append(subprocess.Popen([sys.executable, "-m", "data_plane"], env=env, cwd=ROOT,
                                              stdout=subprocess.DEVNULL, stderr=zen_err))
            zen = procs[-1]
            mconf = work / "mitm"
            procs.append(subprocess.Popen(
                [a.mitmdump, "-q", "--listen-host", "127.0.0.1", "--listen-port", str(mport),
                 "--set", f"confdir={mconf}", "--set", f"ssl_verify_upstream_trusted_ca={work / 'root.crt'}",
                 "-s", str(ROOT / "bench" / "mitm_resolve.py")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            mitm = procs[-1]
            wait_port(zport, proc=zen)
            wait_port(mport, proc=mitm)
            deadline = time.monotonic() + 30
            while not (mconf / "mitmproxy-ca-cert.pem").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            auth = "Basic " + base64.b64encode(f"bench:{demo.PROXY_SECRET}".encode()).decode()
            targets = {
                "direct": Target("direct", "direct", str(work / "root.crt"), oport, pid=nginx.pid),
                "zen": Target("zen", "keyward ZEN", org_root, oport, zport, auth, pid=zen.pid),
                "mitm": Target("mitm", "mitmproxy", str(mconf / "mitmproxy-ca-cert.pem"), oport, mport, pid=mitm.pid),
            }
            probes = Probes({"direct": nginx.pid, "zen": zen.pid, "mitm": mitm.pid})
            res = run(targets, probes, s, token, demo.PROXY_SECRET)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    others = [w.cpu["others"] / w.seconds for shape in ("new-conn", "keepalive") for w in res[shape].values()]
    busy = statistics.mean(others) * 100 / (os.cpu_count() or 1)
    out = Path(a.out) if a.out else Path(f"/tmp/zen_vs_mitmproxy-{started:%Y%m%d-%H%M%S}.md")
    lines = [f"keyward ZEN vs mitmproxy vs direct to origin, {started:%Y-%m-%d %H:%M} UTC, {machine()}; "
             f"load average {load[0]:.2f} at the start; other processes used {busy:.0f}% of the machine "
             "during the throughput rows (0% = quiet" + ("; the machine was busy: noisy figures" if busy > 10 else "")
             + ")." + (" Sizes: --quick." if a.quick else ""),
             "", *table(res, s), "", versions(a.mitmdump) + "."]
    failures = [f"{shape} {who}: {len(w.errors)} failed, e.g. {w.errors[0]}" for shape in
                ("new-conn", "keepalive", "first-visit") for who, w in res[shape].items() if w.errors]
    failures += [f"{shape} {who}: {len(v['errors'])} failed, e.g. {v['errors'][0]}"
                 for shape in ("idle-memory", "leaf-memory") for who, v in res[shape].items() if v["errors"]]
    failures += [f"idle-memory {who}: {v['closed_early']} closed by the proxy before the reading"
                 for who, v in res["idle-memory"].items() if v["closed_early"]]
    if failures:
        lines += ["", "Failures: " + "; ".join(failures)]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(_raw(res, s), indent=1, default=str) + "\n")
    print(f"written to {out} (raw figures: {out.with_suffix('.json')})")


def run(targets: dict[str, Target], probes: Probes, s: Sizes, token: str, secret: str) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for t in targets.values():  # each path works (and the ZEN has its org's key) before anything is timed
        asyncio.run(_new_conn_once(t, t.context()))
    for shape, keep in (("new-conn", False), ("keepalive", True)):
        res[shape] = {}
        for key, t in targets.items():
            asyncio.run(throughput(t, keep, s.warmup, None))
            res[shape][key] = w = asyncio.run(throughput(t, keep, s.seconds, probes))
            print(f"{shape:11} {t.title:12} {w.rps:8.0f} req/s  CPU {w.cpu_per_ms(key):.3f} ms/request"
                  f"{_errs(w)}", flush=True)
    res["first-visit"] = {}
    for key, t in targets.items():
        hosts = [f"fv{i}-{token}.{DOMAIN}" for i in range(s.first_visits)]
        res["first-visit"][key] = w = asyncio.run(first_visits(t, hosts, probes))
        print(f"first-visit {t.title:12} p50 {statistics.median(w.latencies_ms or [0]):.2f} ms"
              f"{_errs(w)}", flush=True)
    res["download"] = {}
    for proto in ("1.1", "2"):
        mbs: dict[str, list[float]] = {key: [] for key in targets}
        res["download"][proto] = mbs
        for t in targets.values():
            curl_download(t, proto, secret)  # warm-up
        for _ in range(s.downloads):  # in turn, so that a busier moment of the machine falls on each path
            for key, t in targets.items():
                mbs[key].append(curl_download(t, proto, secret))
        for key, t in targets.items():
            print(f"download    {t.title:12} HTTP/{proto:3} {statistics.median(mbs[key]):8.1f} MB/s", flush=True)
    from tests.tunnel import ConnectTunnel

    res["h2-keepalive"] = {}
    with ConnectTunnel(targets["zen"].proxy_port or 0, DOMAIN, targets["zen"].origin_port, "bench", secret) as zt, \
            ConnectTunnel(targets["mitm"].proxy_port or 0, DOMAIN, targets["mitm"].origin_port, "bench", "unused") as mt:
        for key, port in (("direct", targets["direct"].origin_port), ("zen", zt.port), ("mitm", mt.port)):
            h2load(port, 200)  # warm-up
            res["h2-keepalive"][key] = h2 = h2load(port, s.h2_n)
            print(f"h2-keepalive {targets[key].title:11} {h2['rps']:8.0f} req/s", flush=True)
        problems = [f"{who}: {e}" for who, t in (("keyward", zt), ("mitmproxy", mt)) for e in (*t.errors, *t.refused)]
        if problems:
            raise BenchError(f"tunnel problems: {problems}")
    # mitmproxy keeps at most 100 leaves (CertStore.STORE_CAP): its figure would say nothing
    hosts = [f"leaf{i}-{token}.{DOMAIN}" for i in range(s.leaves)]
    warm = [f"warm{i}-{token}.{DOMAIN}" for i in range(min(100, s.leaves // 5))]
    res["leaf-memory"] = {"zen": (lm := asyncio.run(leaf_memory(targets["zen"], hosts, warm)))}
    print(f"leaf-memory {targets['zen'].title:12} {lm['per_1000_mb']:8.2f} MB per 1,000 leaves", flush=True)
    res["idle-memory"] = {}
    for key in ("zen", "mitm"):
        t = targets[key]
        res["idle-memory"][key] = im = asyncio.run(idle_memory(t, s.idle))
        print(f"idle-memory {t.title:12} {im['per_10000_mb']:8.1f} MB per 10,000 idle connections "
              f"(opened in {im['opened_in_s']:.1f} s)", flush=True)
    return res


def _raw(res: dict[str, Any], s: Sizes) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        if isinstance(v, Window):
            return {"done": v.done, "seconds": v.seconds, "rps": v.rps, "cpu_s": v.cpu, "errors": v.errors[:20],
                    "latencies_ms": v.latencies_ms}
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {"sizes": asdict(s), **plain(res)}


if __name__ == "__main__":
    main()
