"""The Prometheus endpoint of every keyward process (the CA, the ZEN, the operator): one
``serve``, so each binds, answers and is probed the same way.

``GET /metrics`` (and ``/``) is the exposition of the process's registry; ``GET /healthz``,
when the process gives a ``health`` report, is that report as JSON, 200 when healthy and 503
otherwise (a probe or a person sees the reason). Anything else is a 404.

A listen address with no host (``:9464``) binds to loopback (:data:`common.env.LOOPBACK`), as
every listen default of keyward does: exposing an endpoint is a deliberate act (the Helm chart
gives 0.0.0.0 explicitly). Metrics carry no key material, and no org id but the ones each
process's own metrics document.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from common.env import split_hostport


class _V6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


Health = Callable[[], tuple[bool, dict[str, object]]]


def serve(listen: str, registry: CollectorRegistry, health: Health | None = None, *, name: str = "metrics") -> int:
    """Serve ``registry`` (and ``health``) on ``listen`` (host:port) from a daemon thread; return
    the bound port. Raises OSError when the address cannot be bound."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
            path = self.path.split("?")[0]
            if path == "/healthz" and health is not None:
                ok, report = health()
                code, body, ctype = (200 if ok else 503), json.dumps(report).encode(), "application/json"
            elif path in ("/metrics", "/"):
                code, body, ctype = 200, generate_latest(registry), CONTENT_TYPE_LATEST
            else:
                code, body, ctype = 404, b"try /metrics" + (b" or /healthz" if health else b"") + b"\n", "text/plain"
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass  # no access log: scrapes every few seconds would drown the process's own lines

    host, port = split_hostport(listen)
    server = (_V6Server if ":" in host else http.server.ThreadingHTTPServer)((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    return int(server.server_address[1])
