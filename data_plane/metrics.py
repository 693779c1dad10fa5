"""Prometheus metrics of the ZEN, on their own port. No key material in labels."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

CONNECTIONS = Counter("keyward_zen_connections_total", "Client connections, by org", ["org"], registry=REGISTRY)
DECISIONS = Counter("keyward_zen_connects_total",
                    "CONNECTs by org and outcome (intercepted, tunnelled, blocked, refused)",
                    ["org", "outcome"], registry=REGISTRY)
REQUESTS = Counter("keyward_zen_requests_total", "Inspected HTTP requests, by org and status", ["org", "status"],
                   registry=REGISTRY)
CERT_CACHE = Counter("keyward_zen_cert_cache_total", "Minted-certificate cache lookups", ["result"],
                     registry=REGISTRY)
KEY_FETCHES = Counter("keyward_zen_key_fetches_total", "Key fetches from the CA, by result", ["result"],
                      registry=REGISTRY)
KEYS_HELD = Gauge("keyward_zen_keys_held", "Org keys held (one signer process each)", registry=REGISTRY)
SIGNER_LOCKED = Gauge("keyward_zen_signer_memory_locked",
                      "1 if the last signer started could lock the memory holding its key", registry=REGISTRY)
CA_REACHABLE = Gauge("keyward_zen_ca_reachable", "1 if the CA answered last time", registry=REGISTRY)


def serve(listen: str) -> int:
    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=REGISTRY)
    return int(server.server_port)
