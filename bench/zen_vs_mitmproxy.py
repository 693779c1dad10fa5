"""Interception speed: the keyward ZEN side by side with mitmproxy (the peer),
in one run, on this machine, reported as ratios.

Both proxies intercept the same local HTTPS origin; a client makes requests
through each, in two shapes:

  new-conn   every request on a new TLS connection (CONNECT + two handshakes +
             a leaf from the minting cache): what browsing many sites costs
  keepalive  requests reusing one intercepted connection: the relay path

Usage (needs the local stack: it starts it if needed):

    python -m venv /tmp/benchvenv && /tmp/benchvenv/bin/pip install mitmproxy
    .venv/bin/python bench/zen_vs_mitmproxy.py --mitmdump /tmp/benchvenv/bin/mitmdump [--n 300]

Prints requests/s and p50/p99 latency for each, and keyward/mitmproxy ratios.
Nothing here is a test: speed is never asserted.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devstack import pki, stack  # noqa: E402
from keylib import proxyauth  # noqa: E402

BODY = b"x" * 1024


class Origin(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else delayed ACKs add 40 ms to every keep-alive response

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *a: object) -> None:
        pass


def start_origin(d: Path) -> int:
    ca, ca_key = pki.build_cert(subject_cn="bench web root", issuer=None, issuer_key=None, is_ca=True)
    pki.write_identity(d, "root", ca, ca_key)
    site, key = pki.build_cert(subject_cn="bench.test", issuer=ca, issuer_key=ca_key, server=True, dns=["bench.test"])
    pki.write_identity(d, "site", site, key)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Origin)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "site.crt", d / "site.key")
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return int(srv.server_address[1])


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
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
        conn.request("GET", "/")
        r = conn.getresponse()
        if r.read() != BODY or r.status != 200:
            raise SystemExit(f"bad response {r.status}")
        lat.append(time.perf_counter() - t0)
    if conn is not None:
        conn.close()
    return lat


def summary(lat: list[float]) -> dict[str, float]:
    s = sorted(lat)
    return {"rps": len(s) / sum(s), "p50_ms": statistics.median(s) * 1000,
            "p99_ms": s[min(len(s) - 1, int(len(s) * 0.99))] * 1000}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mitmdump", required=True)
    ap.add_argument("--n", type=int, default=300)
    a = ap.parse_args()

    stack.up()
    from devstack import demo

    policy = {"fail_mode": "FAIL_MODE_OPEN", "proxy_credential_verifiers": [proxyauth.make(demo.PROXY_SECRET)]}
    demo.ensure_org("bench", policy)
    demo.call("org-admin-bench", "keyward.v1.Admin/UpdatePolicy", {"org_id": "bench", "policy": policy})
    demo.activate("bench", "org-admin-bench")
    work = Path(tempfile.mkdtemp(prefix="keyward-bench-"))
    oport = start_origin(work)
    org_root = str(demo.DEMO / "bench-root" / "root.crt")

    zport, mport = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARD_ZEN")}
    env.update(KEYWARD_ZEN_LISTEN=f"127.0.0.1:{zport}", KEYWARD_ZEN_METRICS_LISTEN="", KEYWARD_CA_ADDR=stack.CA_ADDR,
               KEYWARD_ZEN_TLS_CERT_FILE=str(demo.PKI / "zen-public.crt"),
               KEYWARD_ZEN_TLS_KEY_FILE=str(demo.PKI / "zen-public.key"), KEYWARD_ZEN_CA_TRUST_FILE=str(demo.PKI / "ca.crt"),
               KEYWARD_MASTER_SECRET_FILE=str(stack.secret_dir() / "master.key"),
               KEYWARD_ZEN_EXTRA_ROOTS_FILE=str(work / "root.crt"), KEYWARD_ZEN_RESOLVE="bench.test=127.0.0.1")
    zen = subprocess.Popen([sys.executable, "-m", "data_plane"], env=env, cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
        print(json.dumps(results, indent=2))
        for shape, r in results.items():
            print(f"{shape:10} keyward/mitmproxy: throughput x{r['keyward']['rps'] / r['mitmproxy']['rps']:.2f}, "
                  f"p50 latency x{r['keyward']['p50_ms'] / r['mitmproxy']['p50_ms']:.2f}")
    finally:
        zen.terminate()
        mitm.terminate()


if __name__ == "__main__":
    main()
