"""Prometheus metrics of the ZEN, and its health report, on their own port. No key material
in labels or in the report."""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from common import metrics
from common.metrics import Health

REGISTRY = CollectorRegistry(auto_describe=True)

PROXY_AUTH = Counter("keyward_zen_proxy_auth_total",
                     "Proxy credential checks by result (ok, bad, throttled: refused unchecked)",
                     ["result"], registry=REGISTRY)
SIGNERS_EVICTED = Counter("keyward_zen_signers_evicted_total",
                          "Org keys dropped to stay within KEYWARD_ZEN_MAX_KEYS (least recently used)",
                          registry=REGISTRY)
CONNECTIONS = Counter("keyward_zen_connections_total", "Client connections, by org", ["org"], registry=REGISTRY)
DECISIONS = Counter("keyward_zen_connects_total",
                    "CONNECTs by org and outcome (intercepted, tunnelled, blocked, refused)",
                    ["org", "outcome"], registry=REGISTRY)
REQUESTS = Counter("keyward_zen_requests_total", "Inspected HTTP requests, by org and status", ["org", "status"],
                   registry=REGISTRY)
H2_ERRORS = Counter("keyward_zen_h2_errors_total",
                    "HTTP/2 connections ended for a protocol error or a flood, by side (client, origin) and kind",
                    ["side", "kind"], registry=REGISTRY)
CERT_CACHE = Counter("keyward_zen_cert_cache_total", "Minted-certificate cache lookups", ["result"],
                     registry=REGISTRY)
KEY_FETCHES = Counter("keyward_zen_key_fetches_total", "Key fetches from the CA, by result", ["result"],
                      registry=REGISTRY)
# Set by the supervisor only: with workers (multiprocess mode), the live processes' largest value is its.
KEYS_HELD = Gauge("keyward_zen_keys_held", "Org keys held (one signer process each)", registry=REGISTRY,
                  multiprocess_mode="livemax")
SIGNER_LOCKED = Gauge("keyward_zen_signer_memory_locked",
                      "1 if the last signer started could lock the memory holding its key", registry=REGISTRY,
                      multiprocess_mode="livemax")
CA_REACHABLE = Gauge("keyward_zen_ca_reachable", "1 if the CA answered last time", registry=REGISTRY,
                     multiprocess_mode="livemax")
ORIGIN_CONNECTIONS = Counter("keyward_zen_origin_connections_total",
                             "Origin connections used by intercepted connections: reused (idle, from the pool), "
                             "resumed (a new connection, its TLS session resumed) or new (a full handshake)",
                             ["how"], registry=REGISTRY)

_children: dict[tuple[object, tuple[str, ...]], Any] = {}


def child(metric: Counter | Gauge, *labels: str) -> Any:
    """``metric.labels(*labels)``, the child kept (prometheus_client checks and locks on each
    ``labels``; these are counted per connection and per request). Children are never removed."""
    c = _children.get((metric, labels))
    if c is None:
        c = _children[(metric, labels)] = metric.labels(*labels)
    return c


def serve(listen: str, health: Health | None = None) -> int:
    """Prometheus metrics on ``/metrics`` and, when ``health`` is given, ``/healthz``: a JSON
    report, 200 when healthy and 503 otherwise (:func:`common.metrics.serve`). With worker
    processes (PROMETHEUS_MULTIPROC_DIR set before prometheus_client was imported), the sum
    over every process of the ZEN."""
    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return metrics.serve(listen, registry, health, name="zen-metrics")
