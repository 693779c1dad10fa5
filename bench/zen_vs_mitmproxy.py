"""Interception speed: the keyward ZEN side by side with mitmproxy (the peer),
in one run, on this machine, reported as ratios.

Both proxies intercept the same local HTTPS origin (nginx, HTTP/2 and
HTTP/1.1, 1 KiB responses); a client makes requests through each, in three
shapes:

  new-conn      every request on a new TLS connection (CONNECT + two
                handshakes + a leaf from the minting cache), HTTP/1.1: what
                browsing many sites costs
  keepalive     HTTP/1.1 requests reusing one intercepted connection,
                sequential: the relay path
  h2-keepalive  h2load, one HTTP/2 connection, 10 streams in flight; h2load
                cannot use a proxy, so it connects to a CONNECT tunnel
                (tests/tunnel.py) in front of each proxy. Also run against
                the origin itself ("direct"), for reference.

Usage (needs the local stack: it starts it if needed):

    apt-get install nginx nghttp2-client
    python -m venv /tmp/benchvenv && /tmp/benchvenv/bin/pip install mitmproxy
    .venv/bin/python bench/zen_vs_mitmproxy.py --mitmdump /tmp/benchvenv/bin/mitmdump [--n 300] [--h2-n 5000]

Prints requests/s and p50/p99 latency for each (h2-keepalive: h2load's mean
time for request), and keyward/mitmproxy ratios. Nothing here is a test:
speed is never asserted.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devstack import pki, stack  # noqa: E402
from keylib import proxyauth  # noqa: E402

SIZE = 1024
PATH = f"/big?bytes={SIZE}"  # both origins answer SIZE bytes (H2Origin's route; nginx ignores the query)

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


def start_origin(d: Path, kind: str) -> tuple[int, object]:
    """The HTTPS origin for bench.test: nginx (a child process with its own
    config in ``d``) or tests/origins.py's H2Origin (Python, in this process:
    slower, it can be the bottleneck). Both speak h2 and http/1.1 by ALPN.
    Returns the port and a handle for ``stop_origin``."""
    ca, ca_key = pki.build_cert(subject_cn="bench web root", issuer=None, issuer_key=None, is_ca=True)
    pki.write_identity(d, "root", ca, ca_key)
    site, key = pki.build_cert(subject_cn="bench.test", issuer=ca, issuer_key=ca_key, server=True, dns=["bench.test"])
    pki.write_identity(d, "site", site, key)
    if kind == "python":
        from tests.origins import H2Origin

        o = H2Origin(d / "site.crt", d / "site.key")
        return o.port, o
    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                           if os.access(p, os.X_OK)), None)
    if not nginx:
        raise SystemExit("nginx not found: apt-get install nginx (or --origin python)")
    (d / "nginx-tmp").mkdir()
    port = free_port()
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(d=d, port=port, body="x" * SIZE,
                                      user="user root;" if os.geteuid() == 0 else ""))
    proc = subprocess.Popen([nginx, "-p", str(d), "-c", str(conf), "-e", str(d / "nginx-error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc=proc)
    except SystemExit:
        proc.kill()
        raise SystemExit("nginx did not start: " + (d / "nginx-error.log").read_text(errors="replace")[-2000:]) from None
    return port, proc


def stop_origin(handle: object) -> None:
    if isinstance(handle, subprocess.Popen):
        handle.terminate()
        try:
            handle.wait(10)
        except subprocess.TimeoutExpired:
            handle.kill()
    else:
        handle.stop()  # type: ignore[attr-defined]


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


def run_requests(proxy_port: int, origin_port: int, trust: str, n: int, keepalive: bool,
                 proxy_auth: str | None) -> list[float]:
    ctx = ssl.create_default_context(cafile=trust)
    headers = {"Proxy-Authorization": proxy_auth} if proxy_auth else {}
    lat: list[float] = []
    conn: http.client.HTTPSConnection | None = None
    for _ in range(n):
        t0 = time.perf_counter()
        if conn is None or not keepalive:
            if conn is not None:
                conn.close()
            conn = http.client.HTTPSConnection("127.0.0.1", proxy_port, context=ctx, timeout=30)
            conn.set_tunnel("bench.test", origin_port, headers=headers)
        conn.request("GET", PATH)
        r = conn.getresponse()
        if len(r.read()) != SIZE or r.status != 200:
            raise SystemExit(f"bad response {r.status}")
        lat.append(time.perf_counter() - t0)
    if conn is not None:
        conn.close()
    return lat


def summary(lat: list[float]) -> dict[str, float]:
    s = sorted(lat)
    return {"rps": len(s) / sum(s), "p50_ms": statistics.median(s) * 1000,
            "p99_ms": s[min(len(s) - 1, int(len(s) * 0.99))] * 1000}


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def h2load(port: int, n: int, streams: int = 10) -> dict[str, float]:
    """h2load, one connection, ``streams`` in flight, to https://bench.test/
    connected to 127.0.0.1:``port`` (a tunnel, or the origin itself): SNI
    and :authority are bench.test. Every request must succeed with a 2xx."""
    cmd = ["h2load", "-n", str(n), "-c", "1", "-m", str(streams), f"--connect-to=127.0.0.1:{port}",
           f"https://bench.test{PATH}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    done = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
                     r"(\d+) errored, (\d+) timeout", out)
    codes = re.search(r"status codes: (\d+) 2xx", out)
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)\s", out)
    proto = re.search(r"Application protocol: (\S+)", out)
    if r.returncode or not (done and codes and rps and mean and proto):
        raise SystemExit(f"h2load failed ({r.returncode}):\n{out}")
    succeeded, failed, errored, timeout = (int(done[i]) for i in (2, 3, 4, 5))
    if proto[1] != "h2" or succeeded != n or failed or errored or timeout or int(codes[1]) != n:
        raise SystemExit(f"h2load: not every request succeeded over h2 with a 2xx:\n{out}")
    return {"rps": float(rps[1]), "mean_ms": float(mean[1]) * _UNIT[mean[2]], "n": n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mitmdump", required=True)
    ap.add_argument("--n", type=int, default=300, help="requests per HTTP/1.1 shape and proxy")
    ap.add_argument("--h2-n", type=int, default=5000, help="h2load requests per h2-keepalive run")
    ap.add_argument("--origin", choices=("nginx", "python"), default="nginx")
    ap.add_argument("--zen-stderr", help="file for the ZEN's stderr (its logs, access log included); "
                    "default /dev/null")
    a = ap.parse_args()
    if not shutil.which("h2load"):
        raise SystemExit("h2load not found: apt-get install nghttp2-client")

    stack.up()
    from devstack import demo

    policy = {"fail_mode": "FAIL_MODE_OPEN", "proxy_credential_verifiers": [proxyauth.make(demo.PROXY_SECRET)]}
    demo.ensure_org("bench", policy)
    demo.call("org-admin-bench", "keyward.v1.Admin/UpdatePolicy", {"org_id": "bench", "policy": policy})
    demo.activate("bench", "org-admin-bench")
    work = Path(tempfile.mkdtemp(prefix="keyward-bench-"))
    oport, origin = start_origin(work, a.origin)
    org_root = str(demo.DEMO / "bench-root" / "root.crt")

    zport, mport = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARD_ZEN")}
    env.update(KEYWARD_ZEN_LISTEN=f"127.0.0.1:{zport}", KEYWARD_ZEN_METRICS_LISTEN="", KEYWARD_CA_ADDR=stack.CA_ADDR,
               KEYWARD_ZEN_TLS_CERT_FILE=str(demo.PKI / "zen-public.crt"),
               KEYWARD_ZEN_TLS_KEY_FILE=str(demo.PKI / "zen-public.key"), KEYWARD_ZEN_CA_TRUST_FILE=str(demo.PKI / "ca.crt"),
               KEYWARD_MASTER_SECRET_FILE=str(stack.secret_dir() / "master.key"),
               KEYWARD_ZEN_EXTRA_ROOTS_FILE=str(work / "root.crt"), KEYWARD_ZEN_RESOLVE="bench.test=127.0.0.1")
    zen_err = open(a.zen_stderr, "wb") if a.zen_stderr else subprocess.DEVNULL  # noqa: SIM115
    zen = subprocess.Popen([sys.executable, "-m", "data_plane"], env=env, cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=zen_err)
    mconf = work / "mitm"
    mitm = subprocess.Popen([a.mitmdump, "-q", "--listen-host", "127.0.0.1", "--listen-port", str(mport),
                             "--set", f"confdir={mconf}", "--set", f"ssl_verify_upstream_trusted_ca={work / 'root.crt'}",
                             "-s", str(ROOT / "bench" / "mitm_resolve.py")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(zport)
        wait_port(mport)
        deadline = time.monotonic() + 30
        while not (mconf / "mitmproxy-ca-cert.pem").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        auth = "Basic " + __import__("base64").b64encode(f"bench:{demo.PROXY_SECRET}".encode()).decode()
        results: dict[str, dict[str, dict[str, float]]] = {}
        for shape, keep in (("new-conn", False), ("keepalive", True)):
            run_requests(zport, oport, org_root, 20, keep, auth)  # warm-up (key fetch, leaf cache)
            z = summary(run_requests(zport, oport, org_root, a.n, keep, auth))
            run_requests(mport, oport, str(mconf / "mitmproxy-ca-cert.pem"), 20, keep, None)
            m = summary(run_requests(mport, oport, str(mconf / "mitmproxy-ca-cert.pem"), a.n, keep, None))
            results[shape] = {"keyward": z, "mitmproxy": m}
        from tests.tunnel import ConnectTunnel

        h2: dict[str, dict[str, float]] = {}
        with ConnectTunnel(zport, "bench.test", oport, "bench", demo.PROXY_SECRET) as zt, \
                ConnectTunnel(mport, "bench.test", oport, "bench", "unused") as mt:  # mitmdump: no proxyauth
            for name, port in (("direct", oport), ("keyward", zt.port), ("mitmproxy", mt.port)):
                h2load(port, 200)  # warm-up
                h2[name] = h2load(port, a.h2_n)
            problems = [f"{who}: {e}" for who, t in (("keyward", zt), ("mitmproxy", mt))
                        for e in (*t.errors, *t.refused)]
            if problems:
                raise SystemExit(f"tunnel problems: {problems}")
        results["h2-keepalive"] = h2
        print(json.dumps(results, indent=2))
        for shape, r in results.items():
            lat = "mean_ms" if shape == "h2-keepalive" else "p50_ms"
            print(f"{shape:12} keyward/mitmproxy: throughput x{r['keyward']['rps'] / r['mitmproxy']['rps']:.2f}, "
                  f"{lat[:-3]} latency x{r['keyward'][lat] / r['mitmproxy'][lat]:.2f}")
        print()
        print("| shape | keyward req/s | mitmproxy req/s | throughput ratio | latency keyward | latency mitmproxy "
              "| latency ratio |")
        print("|---|---|---|---|---|---|---|")
        for shape, r in results.items():
            lat = "mean_ms" if shape == "h2-keepalive" else "p50_ms"
            z, m = r["keyward"], r["mitmproxy"]
            print(f"| {shape} | {z['rps']:.0f} | {m['rps']:.0f} | x{z['rps'] / m['rps']:.2f} | {fmt_ms(z[lat])} "
                  f"| {fmt_ms(m[lat])} | x{z[lat] / m[lat]:.2f} |")
        d = h2["direct"]
        print(f"\nh2-keepalive direct to the origin ({a.origin}): {d['rps']:.0f} req/s, "
              f"mean {fmt_ms(d['mean_ms'])}")
    finally:
        zen.terminate()
        mitm.terminate()
        for p in (zen, mitm):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        stop_origin(origin)
        if zen_err is not subprocess.DEVNULL:
            zen_err.close()  # type: ignore[union-attr]


def fmt_ms(v: float) -> str:
    return f"{v:.2f} ms" if v < 10 else f"{v:.1f} ms"


if __name__ == "__main__":
    main()
