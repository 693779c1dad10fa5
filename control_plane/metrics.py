"""Prometheus metrics of the CA, served on their own port.

Labels never carry key material. The ``org`` label of key counters is the
org id only when the org exists and the caller was entitled to learn it;
otherwise it is ``"-"`` (bounded cardinality, no existence oracle).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common import metrics

REGISTRY = CollectorRegistry(auto_describe=True)

RPCS = Counter("keyward_ca_rpcs_total", "gRPC calls handled, by method and status code",
               ["method", "code"], registry=REGISTRY)
LATENCY = Histogram("keyward_ca_rpc_duration_seconds", "gRPC call latency (a stream: its whole life), by method",
                    ["method"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                    registry=REGISTRY)
KEYS_SENT = Counter("keyward_ca_keys_sent_total", "Encrypted keys sent to ZENs, by org", ["org"],
                    registry=REGISTRY)
KEYS_REFUSED = Counter("keyward_ca_keys_refused_total", "Key requests refused, by org", ["org"],
                       registry=REGISTRY)
DB_ERRORS = Counter("keyward_ca_db_errors_total", "Database operations that failed (unavailable)",
                    registry=REGISTRY)
AUDIT_SUPPRESSED = Counter("keyward_ca_audit_refusals_suppressed_total",
                           "Refused calls counted but not audited one by one (rate limit)", registry=REGISTRY)
AUDIT_COMMITS = Counter("keyward_ca_audit_commits_total",
                        "Transactions that committed KeySent audit rows (one per batch of concurrent calls)",
                        registry=REGISTRY)
AUDIT_BATCH_ROWS = Histogram("keyward_ca_audit_batch_rows", "KeySent audit rows per committed transaction",
                             buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=REGISTRY)
AUDIT_BATCH_FAILURES = Counter("keyward_ca_audit_batch_failures_total",
                               "Transactions of KeySent audit rows that failed (their calls spooled or refused)",
                               registry=REGISTRY)
AUDIT_ROWS_WAITING = Gauge("keyward_ca_audit_rows_waiting",
                           "KeySent audit rows waiting for the transaction under way to end", registry=REGISTRY)
AUDIT_ROWS_IN_FLIGHT = Gauge("keyward_ca_audit_rows_in_flight", "KeySent audit rows in the transaction under way",
                             registry=REGISTRY)
WATCHERS = Gauge("keyward_ca_watch_streams", "Open WatchKeys streams", registry=REGISTRY)
DB_UP = Gauge("keyward_ca_db_up", "1 if the last database health check succeeded", registry=REGISTRY)


def serve(listen: str) -> int:
    """Start the exposition endpoint (:func:`common.metrics.serve`); return the bound port."""
    return metrics.serve(listen, REGISTRY, name="ca-metrics")
