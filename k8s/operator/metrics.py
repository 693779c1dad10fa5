"""Prometheus metrics of the operator, on their own port (KEYWARD_OPERATOR_METRICS_LISTEN)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from common import metrics

REGISTRY = CollectorRegistry(auto_describe=True)

LEADER = Gauge("keyward_operator_leader", "1 while this replica holds the leader Lease", registry=REGISTRY)
RECONCILES = Counter("keyward_operator_reconciles_total", "Pool reconciliations, by result", ["result"],
                     registry=REGISTRY)
BYPASS = Gauge("keyward_operator_pool_bypass", "1 while the pool's Service points at the bypass relay", ["pool"],
               registry=REGISTRY)
READY_ZENS = Gauge("keyward_operator_pool_ready_zens", "Ready ZEN pods of the pool", ["pool"], registry=REGISTRY)
FAILOVERS = Counter("keyward_operator_db_failovers_total", "Database failovers, by outcome (done, refused, error)",
                    ["outcome"], registry=REGISTRY)
PRIMARY_UP = Gauge("keyward_operator_db_primary_up", "1 while a Postgres server answers as primary",
                   registry=REGISTRY)


def serve(listen: str) -> int:
    """Start the exposition endpoint (:func:`common.metrics.serve`); return the bound port."""
    return metrics.serve(listen, REGISTRY, name="operator-metrics")
