"""common.metrics: one Prometheus endpoint for the CA, the ZEN and the operator."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from prometheus_client import CollectorRegistry, Counter

from common.metrics import serve


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_metrics_health_and_the_loopback_default() -> None:
    reg = CollectorRegistry()
    Counter("keyward_test_total", "a test counter", registry=reg).inc()
    state = {"ok": True}
    port = serve(":0", reg, lambda: (state["ok"], {"status": "ok" if state["ok"] else "degraded"}))
    code, body = _get(port, "/metrics")
    assert code == 200 and "keyward_test_total 1.0" in body
    assert _get(port, "/healthz") == (200, json.dumps({"status": "ok"}))
    state["ok"] = False
    assert _get(port, "/healthz")[0] == 503
    assert _get(port, "/nothing")[0] == 404
    bare = serve("127.0.0.1:0", reg)
    assert _get(bare, "/healthz")[0] == 404  # no report given: no /healthz


def test_no_host_binds_loopback_only() -> None:
    """The CA bound ':PORT' to every interface and the ZEN and operator to loopback: one rule now."""
    import socket

    port = serve(":0", CollectorRegistry())
    addrs = [a for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET) if a[4][0] != "127.0.0.1"]
    if addrs:  # a host with an address besides loopback: nothing answers there
        s = socket.socket()
        s.settimeout(2)
        try:
            assert s.connect_ex((addrs[0][4][0], port)) != 0
        finally:
            s.close()
    assert _get(port, "/metrics")[0] == 200
