"""ZEN CPU per intercepted connection and per keep-alive request, measured as CPU time of the
ZEN's process (utime + stime from /proc/PID/stat), not as a wall-clock rate: other work on
the machine changes rates, much less the CPU a process spends.

The ZEN here is data_plane's own proxy (Proxy, Minter, a real signer process holding an org
key), built the way ``python -m data_plane`` builds it, without the CA: the org, its policy
(proxy authentication by credential, as in bench/zen_vs_mitmproxy.py) and its key are local.
The origin is nginx (HTTP/1.1 and h2, 1 KiB responses); the client is Python's http.client,
as in bench/zen_vs_mitmproxy.py (no ALPN, no TLS session resumption toward the ZEN).

    .venv/bin/python bench/zen_cpu.py [--new 1000] [--keepalive 5000] [--rounds 3]
        [--profile DIR]     # also: cProfile of the ZEN over each shape, in DIR/{new,keepalive}.prof
        [--workers N]       # KEYWARD_ZEN_WORKERS for the ZEN (when it has them)
        [--loop asyncio]    # KEYWARD_ZEN_EVENT_LOOP (the ZEN's default when unset)
        [--mitmdump PATH]   # also mitmdump's CPU per connection / request, same shapes and client
        [--h2]              # the client is curl over HTTP/2 instead (with --mitmdump: not the peer's)
        ZEN settings KEYWARD_ZEN_ORIGIN_* and KEYWARD_ZEN_EVENT_LOOP are taken from the environment.

Prints, per shape, the ZEN's CPU ms per connection / request (median of the rounds) and the
client's wall-clock rate through the ZEN and directly to the origin (indicative only).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import http.client
import json
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECRET = "bench-proxy-secret"  # noqa: S105  (a throwaway for a local benchmark)
ORG = "bench"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of the whole process (every thread), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread), in seconds."""
    return sum(cpu_times(pid))


def zen_pids(pid: int) -> list[int]:
    """The ZEN's process and its workers (not its signer processes)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        kids = []
    out = [pid]
    for k in kids:
        try:
            with open(f"/proc/{k}/cmdline", "rb") as f:
                if b"data_plane.worker" in f.read():
                    out.append(k)
        except OSError:
            pass
    return out


# ------------------------------------------------------------------ the ZEN side (a child process)

def _pki(d: Path) -> None:
    """Origin PKI (web root, bench.test) and the org's (root, intermediate with its key)."""
    from cryptography.hazmat.primitives import serialization

    from keylib.tlsid import build_cert

    web, web_key = build_cert(subject_cn="bench web root", issuer=None, issuer_key=None, is_ca=True)
    site, site_key = build_cert(subject_cn="bench.test", issuer=web, issuer_key=web_key, server=True,
                                dns=["bench.test", "other.test"])
    root, root_key = build_cert(subject_cn="bench org root", issuer=None, issuer_key=None, is_ca=True)
    inter, inter_key = build_cert(subject_cn="bench org intermediate", issuer=root, issuer_key=root_key, is_ca=True)

    def pem(c: Any) -> bytes:
        return bytes(c.public_bytes(serialization.Encoding.PEM))

    def key(k: Any) -> bytes:
        return bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    for name, data in (("web.crt", pem(web)), ("site.crt", pem(site)), ("site.key", key(site_key)),
                       ("org-root.crt", pem(root)), ("inter.crt", pem(inter)),
                       ("inter.der", inter_key.private_bytes(serialization.Encoding.DER,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))):
        (d / name).write_bytes(data)


class LocalKeys:
    """What Proxy asks of keys.KeyManager (policies, signer_for, learn), for one local org."""

    def __init__(self, policy: Any, key: Any) -> None:
        self.policies = {policy.org_id: policy}
        self._key = key
        self.keys = {key.org_id: key}
        self.on_key_gone: list[Any] = []

    async def signer_for(self, org_id: str) -> Any:
        return self._key if org_id == self._key.org_id else None

    async def learn(self, org_id: str) -> Any:
        return self.policies.get(org_id)


def serve(d: Path, origin_port: int, profile_dir: str | None) -> None:
    from common.logs import setup
    from data_plane import config
    from data_plane.keys import OrgKey
    from data_plane.mint import Minter
    from data_plane.policy import OrgPolicy
    from data_plane.proxy import Proxy, origin_context
    from data_plane.signer import Signer
    from keylib import proxyauth
    from keylib.securemem import from_bytes

    setup("INFO", "keyward-zen", queued=not os.environ.get("BENCH_PLAIN_SINK"))  # as python -m data_plane
    inter_pem = (d / "inter.crt").read_text()
    signer = Signer.start(from_bytes((d / "inter.der").read_bytes(), require_lock=False), inter_pem)
    key = OrgKey(ORG, "k1", 1, inter_pem, (d / "org-root.crt").read_text(), signer)
    policy = OrgPolicy(ORG, proxy_verifiers=(proxyauth.make(SECRET),), blocked_url_prefixes=("bench.test/blocked",))
    roots = str(d / "web.crt")
    # What a worker reads from the environment too (the CA's settings are not used here).
    os.environ.update({"KEYWARD_ZEN_TLS_CERT_FILE": "-", "KEYWARD_ZEN_TLS_KEY_FILE": "-",
                       "KEYWARD_ZEN_CA_TRUST_FILE": "-", "KEYWARD_MASTER_SECRET_FILE": "-",
                       "KEYWARD_ZEN_EXTRA_ROOTS_FILE": str(d / "web.crt"), "KEYWARD_ZEN_RESOLVE": "bench.test=127.0.0.1"})
    cfg = config.from_env({k: v for k, v in os.environ.items() if k.startswith(("KEYWARD_ZEN_ORIGIN", "KEYWARD_ZEN_",
                                                                                "KEYWARD_MASTER"))})
    extra: dict[str, Any] = {}
    if hasattr(cfg, "origin_pool"):  # the ZEN's settings as they are at this commit
        from data_plane.origins import OriginPool

        extra["pool"] = OriginPool(max_idle=cfg.origin_pool, idle_seconds=cfg.origin_idle)
    if hasattr(cfg, "origin_session_seconds"):
        from data_plane.origins import Sessions

        extra["sessions"] = Sessions(seconds=cfg.origin_session_seconds)
    proxy = Proxy(LocalKeys(policy, key), Minter(), origin_context(roots),  # type: ignore[arg-type]
                  origin_h1_ctx=origin_context(roots, ("http/1.1",)), resolve={"bench.test": "127.0.0.1"}, **extra)

    prof: Any = None
    if profile_dir:
        import cProfile

        prof = cProfile.Profile(time.thread_time)  # CPU time of the event loop's thread, not wall-clock

        def on(*_: object) -> None:
            prof.enable()

        def off(*_: object) -> None:
            prof.disable()
            prof.dump_stats(os.path.join(profile_dir, (d / "profile-name").read_text().strip()))
            prof.clear()
        signal.signal(signal.SIGUSR1, on)
        signal.signal(signal.SIGUSR2, off)

    workers = getattr(cfg, "workers", 1)

    async def main() -> None:
        server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0, limit=64 * 1024, start_serving=workers == 1)
        if workers > 1:  # as python -m data_plane with KEYWARD_ZEN_WORKERS: this process supervises
            from data_plane.workers import Supervisor

            sup = Supervisor(proxy.km, workers, [s.fileno() for s in server.sockets], [])
            await sup.start()
        print(server.sockets[0].getsockname()[1], flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with server:
            await stop.wait()
        signer.stop()

    if getattr(cfg, "event_loop", "asyncio") == "uvloop":  # as python -m data_plane runs it
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


# ------------------------------------------------------------------ the driver

NGINX_CONF = """\
daemon off;
worker_processes 1;
{user}
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 1024; }}
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
    }}
}}
"""
SIZE = 1024
PATH = f"/big?bytes={SIZE}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int) -> None:
    for _ in range(300):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port}")


def requests(port: int, trust: str, n: int, keepalive: bool, via_proxy: bool, origin_port: int) -> float:
    """``n`` requests, each on a new connection or all on one; returns the wall-clock seconds."""
    ctx = ssl.create_default_context(cafile=trust)
    auth = "Basic " + __import__("base64").b64encode(f"{ORG}:{SECRET}".encode()).decode()
    conn: http.client.HTTPSConnection | None = None
    t0 = time.perf_counter()
    for _ in range(n):
        if conn is None or not keepalive:
            if conn is not None:
                conn.close()
            if via_proxy:
                conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
                conn.set_tunnel("bench.test", origin_port, headers={"Proxy-Authorization": auth})
            else:
                conn = http.client.HTTPSConnection("bench.test", origin_port, context=ctx, timeout=30)
                conn.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", origin_port)),
                                            server_hostname="bench.test")
        conn.request("GET", PATH)
        r = conn.getresponse()
        if r.status != 200 or len(r.read()) != SIZE:
            raise SystemExit(f"bad response {r.status}")
    if conn is not None:
        conn.close()
    return time.perf_counter() - t0


def _peer(a: argparse.Namespace, d: Path, oport: int) -> dict[str, float]:
    """mitmdump's CPU per new connection and per keep-alive request, the same shapes and client."""
    mport = free_port()
    conf = d / "mitm"
    mitm = subprocess.Popen([a.mitmdump, "-q", "--listen-host", "127.0.0.1", "--listen-port", str(mport),
                             "--set", f"confdir={conf}", "--set", f"ssl_verify_upstream_trusted_ca={d / 'web.crt'}",
                             "-s", str(ROOT / "bench" / "mitm_resolve.py")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(mport)
        for _ in range(100):
            if (conf / "mitmproxy-ca-cert.pem").exists():
                break
            time.sleep(0.1)
        trust = str(conf / "mitmproxy-ca-cert.pem")
        out: dict[str, float] = {}
        for shape, n, keep in (("new", a.new, False), ("keepalive", a.keepalive, True)):
            requests(mport, trust, 50, keep, True, oport)
            per = []
            for _ in range(a.rounds):
                c0 = cpu_seconds(mitm.pid)
                requests(mport, trust, n, keep, True, oport)
                per.append((cpu_seconds(mitm.pid) - c0) / n * 1000)
            out[shape] = round(statistics.median(per), 4)
        return out
    finally:
        mitm.terminate()
        mitm.wait(10)


def _cg(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, stdout=subprocess.DEVNULL)


def _instructions(dump: Path) -> int:
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith("totals:"):  # not "summary:", which wraps around when instrumentation is toggled
            return int(line.split()[1])
    raise SystemExit(f"no totals in {dump}")


def requests_h2(port: int, trust: str, n: int, keepalive: bool, via_proxy: bool, origin_port: int) -> float:
    """As :func:`requests`, by curl over HTTP/2 (a browser's protocol): each request a curl of its
    own (a new connection), or one curl for all (one connection)."""
    base = ["curl", "-sS", "--http2", "--fail", "--cacert", trust, "--resolve", f"bench.test:{origin_port}:127.0.0.1"]
    if via_proxy:
        base += ["--proxy", f"http://127.0.0.1:{port}", "--proxy-user", f"{ORG}:{SECRET}"]
    url = f"https://bench.test:{origin_port}{PATH}"
    t0 = time.perf_counter()
    if keepalive:
        subprocess.run([*base, *(["-o", "/dev/null", url] * n)], check=True, stdout=subprocess.DEVNULL)
    else:
        for _ in range(n):
            subprocess.run([*base, "-o", "/dev/null", url], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=1000)
    ap.add_argument("--keepalive", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), help="KEYWARD_ZEN_EVENT_LOOP for the ZEN")
    ap.add_argument("--h2", action="store_true", help="the client is curl over HTTP/2 (a browser's protocol)")
    ap.add_argument("--mitmdump", help="also mitmdump's CPU, same shapes (bench/zen_vs_mitmproxy.py says how to "
                    "install it)")
    ap.add_argument("--callgrind", help="run the ZEN under callgrind, dumps in this directory; reports "
                    "instructions (user space only, deterministic) per connection / request")
    ap.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        serve(Path(a.serve[0]), int(a.serve[1]), a.profile)
        return
    global requests
    if a.h2:
        requests = requests_h2  # noqa: F811
    d = Path(tempfile.mkdtemp(prefix="keyward-zencpu-"))
    _pki(d)
    (d / "nginx-tmp").mkdir()
    oport = free_port()
    (d / "nginx.conf").write_text(NGINX_CONF.format(d=d, port=oport, body="x" * SIZE,
                                                    user="user root;" if os.geteuid() == 0 else ""))
    nginx = subprocess.Popen(["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "nginx-error.log")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = dict(os.environ)
    if a.workers:
        env["KEYWARD_ZEN_WORKERS"] = str(a.workers)
    if a.loop:
        env["KEYWARD_ZEN_EVENT_LOOP"] = a.loop
    if a.profile:
        os.makedirs(a.profile, exist_ok=True)
    cmd = [sys.executable, __file__, "--serve", str(d), str(oport)] + (["--profile", a.profile] if a.profile else [])
    if a.callgrind:
        os.makedirs(a.callgrind, exist_ok=True)
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-systime=no",
               f"--callgrind-out-file={os.path.abspath(a.callgrind)}/cg.%p", *cmd]
    err = open(os.environ["BENCH_ZEN_STDERR"], "wb") if os.environ.get("BENCH_ZEN_STDERR") else subprocess.DEVNULL  # noqa: SIM115
    zen = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
    assert zen.stdout is not None
    try:
        zport = int(zen.stdout.readline())
        wait_port(oport)
        org_root = str(d / "org-root.crt")
        results: dict[str, Any] = {}
        for shape, n, keep in (("new", a.new, False), ("keepalive", a.keepalive, True)):
            requests(zport, org_root, 50, keep, True, oport)  # warm-up: the leaf, the credential cache
            per: list[float] = []
            walls: list[float] = []
            sys_share: list[float] = []
            shares: list[float] = []
            for r in range(a.rounds):
                if a.callgrind and r == 0:
                    _cg(zen.pid, "-i", "on")
                    walls.append(requests(zport, org_root, n, keep, True, oport))
                    _cg(zen.pid, "-d", shape)
                    _cg(zen.pid, "-i", "off")
                    dumps = sorted(Path(a.callgrind).glob(f"cg.{zen.pid}.*"), key=lambda p: p.stat().st_mtime)
                    per.append(_instructions(dumps[-1]) / n / 1e6)
                    continue
                if a.profile and r == 0:
                    (d / "profile-name").write_text(f"{shape}.prof")
                    os.kill(zen.pid, signal.SIGUSR1)
                pids = zen_pids(zen.pid)
                before = [cpu_seconds(p) for p in pids]
                u0, s0 = (sum(x) for x in zip(*map(cpu_times, pids), strict=True))
                walls.append(requests(zport, org_root, n, keep, True, oport))
                u1, s1 = (sum(x) for x in zip(*map(cpu_times, pids), strict=True))
                spent = [cpu_seconds(p) - b for p, b in zip(pids, before, strict=True)]
                shares = [round(x / max(1e-9, sum(spent)), 2) for x in spent]
                per.append((u1 - u0 + s1 - s0) / n * 1000)
                sys_share.append((s1 - s0) / max(1e-9, u1 - u0 + s1 - s0))
                if a.profile and r == 0:
                    os.kill(zen.pid, signal.SIGUSR2)
                    time.sleep(1)
            direct = requests(oport, str(d / "web.crt"), n, keep, False, oport)
            key = "zen_mega_instructions" if a.callgrind else "zen_cpu_ms"
            results[shape] = {key: round(statistics.median(per), 4), "rounds": [round(x, 4) for x in per],
                              **({"system_share": round(statistics.median(sys_share), 2)} if sys_share else {}),
                              **({"process_shares": shares} if len(shares) > 1 else {}),
                              "rate_via_zen": round(n / statistics.median(walls)), "rate_direct": round(n / direct),
                              "ratio": round(direct / statistics.median(walls), 3)}
        if a.mitmdump:
            results["mitmproxy"] = _peer(a, d, oport)
            for shape in ("new", "keepalive"):
                results[shape]["mitmproxy_cpu_ms"] = results["mitmproxy"][shape]
                if "zen_cpu_ms" in results[shape]:
                    results[shape]["mitmproxy_over_zen"] = round(results["mitmproxy"][shape]
                                                                 / results[shape]["zen_cpu_ms"], 2)
        print(json.dumps({"at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **results}, indent=1))
    finally:
        zen.send_signal(signal.SIGTERM)
        try:
            zen.wait(10)
        except subprocess.TimeoutExpired:
            zen.kill()
        nginx.terminate()
        nginx.wait(10)


if __name__ == "__main__":
    main()
