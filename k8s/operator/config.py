"""The operator's configuration: read from the environment here, and only here.

Every field documents its unit, default and reason. Secrets never come from
the environment: the operator reads them from Kubernetes Secrets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

from common.env import SettingError, get, hostport, integer_in, number_in, seconds_in

ConfigError = SettingError
"""A setting is malformed; the message names it and what is allowed."""


@dataclass(frozen=True)
class OperatorConfig:
    release: str = "keyward"
    """The chart's fullname (KEYWARD_RELEASE): prefix of every object the operator
    manages, e.g. ``<release>-ca``, ``<release>-zen-<pool>``. Default "keyward"."""
    instance: str = ""
    """The Helm release name (KEYWARD_INSTANCE): the ZEN pods' app.kubernetes.io/instance label,
    which the CA's NetworkPolicy admits. Default: the release with "-keyward" removed."""
    namespace: str = "keyward"
    """Namespace of the release (KEYWARD_NAMESPACE), from the downward API. Default "keyward"."""
    trust_domain: str = "keyward"
    """SPIFFE trust domain of the platform identities (KEYWARD_TRUST_DOMAIN); must
    match the CA's. Default "keyward"."""
    zen_image: str = "keyward/zen:0.1.0"
    """Image of the ZEN pods (KEYWARD_ZEN_IMAGE). Default keyward/zen:0.1.0."""
    ca_addr: str = ""
    """host:port of the CA's gRPC port (KEYWARD_CA_ADDR). Default
    ``<release>-ca.<namespace>.svc:50051``, a name in the CA server certificate."""
    kube_api: str = ""
    """Kubernetes API URL (KEYWARD_KUBE_API). Default: in-cluster, with the
    ServiceAccount token; tests point it at the KMock stand-in."""
    interval: float = 5.0
    """Seconds between checks of each pool and of the database (KEYWARD_OPERATOR_INTERVAL):
    how fast bypass, eviction and failover react. Default 5; 0.2 .. 300."""
    failover_after: float = 30.0
    """Seconds the Postgres primary must be lost before the operator fails over
    (KEYWARD_FAILOVER_AFTER_SECONDS). Long enough to ride out a pod restart, short
    enough that writes do not stay down. Default 30; 1 .. 3600."""
    pg_cluster_file: str = ""
    """A dbops ClusterSpec JSON (KEYWARD_PG_CLUSTER_FILE). Default: derived from the
    chart's StatefulSet (``<release>-postgres-{0,1,2}``) and its passwords Secret."""
    pg_required_sync: int = 2
    """Standbys that must confirm each commit (KEYWARD_PG_REQUIRED_SYNC, the chart's
    ``postgres.requiredSync``): the failover needs 3 - k standbys to answer. Default 2; 1 or 2."""
    cert_days: float = 90.0
    """Lifetime in days of the platform TLS identities the operator issues
    (KEYWARD_PKI_CERT_DAYS); renewed when a third remains. Default 90; 1 .. 825."""
    ca_call_timeout: float = 10.0
    """Seconds per gRPC call to the CA (KEYWARD_CA_CALL_TIMEOUT). Default 10."""
    secrets_name: str = ""
    """The Secret with master-secret and the database passwords (KEYWARD_SECRETS_NAME; the chart's
    ``secrets.existingSecret``). Default ``<release>-secrets``, the one the chart generates."""
    pod_name: str = ""
    """This replica's name (KEYWARD_POD_NAME, from the downward API): its identity as holder of the
    leader Lease. Default: hostname and pid."""
    health_listen: str = "0.0.0.0:8080"
    """Where /healthz is served (KEYWARD_OPERATOR_HEALTH_LISTEN), by leaders and followers alike, for the
    liveness probe. Default 0.0.0.0:8080."""
    metrics_listen: str = ""
    """Prometheus endpoint (KEYWARD_OPERATOR_METRICS_LISTEN), e.g. 0.0.0.0:9466. Default: none."""
    zen_resources: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    """CPU/memory requests and limits of every ZEN pod (KEYWARD_ZEN_RESOURCES_JSON, the
    chart's ``zen.resources`` as JSON). Default: 100m/128Mi requested, 2/512Mi limit."""

    def zen_resources_dict(self) -> dict[str, dict[str, str]] | None:
        return {k: dict(v) for k, v in self.zen_resources} or None

    @property
    def ca_target(self) -> str:
        return self.ca_addr or f"{self.release}-ca.{self.namespace}.svc:50051"

    @property
    def secrets(self) -> str:
        return self.secrets_name or f"{self.release}-secrets"

    @property
    def pg_name(self) -> str:
        return f"{self.release}-postgres"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if env is None else env
        return cls(
            release=env.get("KEYWARD_RELEASE", "") or "keyward",
            instance=env.get("KEYWARD_INSTANCE", ""),
            namespace=env.get("KEYWARD_NAMESPACE", "") or "keyward",
            trust_domain=env.get("KEYWARD_TRUST_DOMAIN", "") or "keyward",
            zen_image=env.get("KEYWARD_ZEN_IMAGE", "") or "keyward/zen:0.1.0",
            ca_addr=env.get("KEYWARD_CA_ADDR", ""),
            kube_api=env.get("KEYWARD_KUBE_API", ""),
            interval=get(env, "KEYWARD_OPERATOR_INTERVAL", 5.0, seconds_in(0.2, 300)),
            failover_after=get(env, "KEYWARD_FAILOVER_AFTER_SECONDS", 30.0, seconds_in(1, 3600)),
            pg_cluster_file=env.get("KEYWARD_PG_CLUSTER_FILE", ""),
            cert_days=get(env, "KEYWARD_PKI_CERT_DAYS", 90.0, number_in(1, 825, "days")),
            pg_required_sync=get(env, "KEYWARD_PG_REQUIRED_SYNC", 2, integer_in(1, 2)),
            ca_call_timeout=get(env, "KEYWARD_CA_CALL_TIMEOUT", 10.0, seconds_in(0.5, 120)),
            secrets_name=env.get("KEYWARD_SECRETS_NAME", ""),
            pod_name=env.get("KEYWARD_POD_NAME", ""),
            health_listen=get(env, "KEYWARD_OPERATOR_HEALTH_LISTEN", "0.0.0.0:8080", hostport),
            metrics_listen=get(env, "KEYWARD_OPERATOR_METRICS_LISTEN", "", hostport),
            zen_resources=_resources(env.get("KEYWARD_ZEN_RESOURCES_JSON", "")),
        )


def _resources(raw: str) -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
    if not raw:
        return ()
    try:
        d = json.loads(raw)
        if not isinstance(d, dict) or not set(d) <= {"requests", "limits"}:
            raise ValueError("keys must be requests and/or limits")
        return tuple((k, tuple((str(a), str(b)) for a, b in dict(v).items())) for k, v in sorted(d.items()))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"KEYWARD_ZEN_RESOURCES_JSON is not a resources object "
                          f'(e.g. {{"requests": {{"cpu": "100m"}}}}): {e}') from e
