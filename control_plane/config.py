"""The CA's configuration: read from the environment in one place.

Secrets come from ``*_FILE`` paths. Every field documents its unit, default
and why. :func:`from_env` is the only reader of ``os.environ`` in the CA.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from common.env import SettingError, boolean, event_loop, get, hostport, integer_in, log_level, seconds_in
from control_plane.errors import ConfigError


@dataclass(frozen=True)
class CAConfig:
    listen: str = "127.0.0.1:50051"
    """KEYWARD_CA_LISTEN, host:port. Default loopback: exposing the CA is a
    deliberate act."""

    db_dsn: str = ""
    """KEYWARD_DB_DSN, a libpq DSN (may list several hosts). Passwords belong
    in a passfile, not here, because the DSN may be printed in diagnostics."""

    tls_cert_file: str = ""
    """KEYWARD_TLS_CERT_FILE: PEM certificate of the CA's gRPC server."""

    tls_key_file: str = ""
    """KEYWARD_TLS_KEY_FILE: PEM key of the CA's gRPC server."""

    client_ca_file: str = ""
    """KEYWARD_CLIENT_CA_FILE: PEM trust anchors for client certificates."""

    db_password_file: str = ""
    """KEYWARD_DB_PASSWORD_FILE: file holding the database password, handed to libpq beside the
    DSN. Default: none (the DSN's passfile or libpq's defaults). Unlike a libpq passfile it may be
    group-readable, as a Kubernetes Secret file is under fsGroup (0440), which libpq refuses."""
    master_secret_file: str = ""
    """KEYWARD_MASTER_SECRET_FILE: file with >= 32 random bytes, the root of
    every key password. Empty: the KEYWARD_MASTER_SECRET variable is read
    (and removed from the environment) instead."""

    trust_domain: str = "keyward"
    """KEYWARD_TRUST_DOMAIN: the SPIFFE trust domain of accepted identities;
    a client certificate from another domain is refused."""

    health_listen: str = ""
    """KEYWARD_HEALTH_LISTEN, host:port of a plaintext server carrying only
    grpc.health.v1 (for kubelet gRPC probes, which cannot do mTLS). Empty
    (default): none; every other service stays mTLS-only."""

    metrics_listen: str = "127.0.0.1:9464"
    """KEYWARD_METRICS_LISTEN, host:port of the Prometheus endpoint; empty
    disables it. Its own port so it can be scraped without client certs."""

    max_message_bytes: int = 1 << 20
    """KEYWARD_MAX_MESSAGE_BYTES, bytes (default 1 MiB). A request larger than
    this gets RESOURCE_EXHAUSTED; a whole PEM chain is far smaller."""

    max_call_seconds: float = 30.0
    """KEYWARD_MAX_CALL_SECONDS, seconds (default 30). Caps every unary call's
    deadline, including calls that sent none, so no request holds a
    connection or a database session indefinitely."""

    max_stream_seconds: int = 3600
    """KEYWARD_MAX_STREAM_SECONDS, seconds (default 3600). A WatchKeys stream
    ends (OK) after this long; the ZEN resumes with after_seq. Every call,
    streams included, is bounded."""

    max_watch_streams: int = 64
    """KEYWARD_MAX_WATCH_STREAMS, streams per client identity (default 64). Every ZEN of a pool
    holds one WatchKeys stream under the pool's identity; more are refused with
    RESOURCE_EXHAUSTED, so one identity cannot make the CA hold replays without end."""

    max_concurrent_streams: int = 100
    """KEYWARD_MAX_CONCURRENT_STREAMS per HTTP/2 connection (default 100)."""

    db_pool_size: int = 8
    """KEYWARD_DB_POOL_SIZE, connections of each pool: the read-write one and each server's (default 8)."""

    require_mlock: bool = True
    """KEYWARD_REQUIRE_MLOCK (default true): refuse to start when the master
    secret cannot be locked in RAM. Turn off only on a laptop without
    CAP_IPC_LOCK, never in production."""

    audit_spool_file: str = ""
    """KEYWARD_AUDIT_SPOOL_FILE: append-only file where KeySent audit events
    wait while no primary is reachable, so ZENs keep getting keys from a
    standby. Empty (default): no key is sent that cannot be audited at once."""

    log_level: str = "INFO"
    """KEYWARD_LOG_LEVEL (default INFO)."""

    event_loop: str = "uvloop"
    """KEYWARD_CA_EVENT_LOOP, uvloop or asyncio (default uvloop): the loop the gRPC server, the
    store and every task run on. uvloop took 15-21% less CA CPU per GetKeyPair at 100/s and
    halved the p99 at 300/s in bench/ca_load.py (bench/README.md); asyncio's own loop is the
    fallback should a library misbehave on uvloop."""

    extra: Mapping[str, str] = field(default_factory=dict)
    """Unused variables with the KEYWARD_ prefix, reported at start to catch typos."""


_KNOWN = {
    "KEYWARD_CA_LISTEN", "KEYWARD_DB_DSN", "KEYWARD_TLS_CERT_FILE", "KEYWARD_TLS_KEY_FILE",
    "KEYWARD_CLIENT_CA_FILE", "KEYWARD_MASTER_SECRET_FILE", "KEYWARD_DB_PASSWORD_FILE", "KEYWARD_MASTER_SECRET",
    "KEYWARD_TRUST_DOMAIN", "KEYWARD_METRICS_LISTEN", "KEYWARD_MAX_MESSAGE_BYTES",
    "KEYWARD_MAX_CALL_SECONDS", "KEYWARD_MAX_CONCURRENT_STREAMS", "KEYWARD_MAX_WATCH_STREAMS", "KEYWARD_DB_POOL_SIZE",
    "KEYWARD_REQUIRE_MLOCK", "KEYWARD_LOG_LEVEL", "KEYWARD_MAX_STREAM_SECONDS", "KEYWARD_HEALTH_LISTEN", "KEYWARD_AUDIT_SPOOL_FILE",
    "KEYWARD_CA_EVENT_LOOP",
}


def from_env(env: Mapping[str, str] | None = None) -> CAConfig:
    env = os.environ if env is None else env
    required = ["KEYWARD_DB_DSN", "KEYWARD_TLS_CERT_FILE", "KEYWARD_TLS_KEY_FILE", "KEYWARD_CLIENT_CA_FILE"]
    missing = [n for n in required if not env.get(n)]
    if missing:
        raise ConfigError(f"missing required settings: {', '.join(missing)}")
    try:
        return CAConfig(
            listen=get(env, "KEYWARD_CA_LISTEN", "127.0.0.1:50051", hostport),
            db_dsn=env["KEYWARD_DB_DSN"],
            tls_cert_file=env["KEYWARD_TLS_CERT_FILE"],
            tls_key_file=env["KEYWARD_TLS_KEY_FILE"],
            client_ca_file=env["KEYWARD_CLIENT_CA_FILE"],
            db_password_file=env.get("KEYWARD_DB_PASSWORD_FILE", ""),
            master_secret_file=env.get("KEYWARD_MASTER_SECRET_FILE", ""),
            trust_domain=env.get("KEYWARD_TRUST_DOMAIN") or "keyward",
            # Empty is a value here: no endpoint.
            metrics_listen=_optional(env, "KEYWARD_METRICS_LISTEN", "127.0.0.1:9464"),
            health_listen=_optional(env, "KEYWARD_HEALTH_LISTEN", ""),
            max_message_bytes=get(env, "KEYWARD_MAX_MESSAGE_BYTES", 1 << 20, integer_in(4096, 64 << 20)),
            max_call_seconds=get(env, "KEYWARD_MAX_CALL_SECONDS", 30.0, seconds_in(0.1, 600)),
            max_stream_seconds=get(env, "KEYWARD_MAX_STREAM_SECONDS", 3600, integer_in(5, 86400)),
            max_watch_streams=get(env, "KEYWARD_MAX_WATCH_STREAMS", 64, integer_in(1, 100000)),
            max_concurrent_streams=get(env, "KEYWARD_MAX_CONCURRENT_STREAMS", 100, integer_in(1, 10000)),
            db_pool_size=get(env, "KEYWARD_DB_POOL_SIZE", 8, integer_in(1, 200)),
            require_mlock=get(env, "KEYWARD_REQUIRE_MLOCK", True, boolean),
            audit_spool_file=env.get("KEYWARD_AUDIT_SPOOL_FILE", ""),
            log_level=get(env, "KEYWARD_LOG_LEVEL", "INFO", log_level),
            event_loop=get(env, "KEYWARD_CA_EVENT_LOOP", "uvloop", event_loop),
            extra={k: "set" for k in env if k.startswith("KEYWARD_") and k not in _KNOWN},
        )
    except SettingError as e:
        raise ConfigError(str(e)) from None


def _optional(env: Mapping[str, str], name: str, default: str) -> str:
    """A listen address where an empty value turns the endpoint off."""
    raw = env.get(name)
    if raw is None:
        return default
    return hostport(name, raw) if raw.strip() else ""
