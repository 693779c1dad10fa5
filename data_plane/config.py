"""The ZEN's configuration: read from the environment in one place.

Secrets come from ``*_FILE`` paths. Each field gives unit, default and why.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field


class ZenConfigError(ValueError):
    """The ZEN's configuration is wrong; it refuses to start."""


@dataclass(frozen=True)
class ZenConfig:
    listen: str = "127.0.0.1:8080"
    """KEYWARD_ZEN_LISTEN, host:port of the forward proxy. Loopback by default."""

    metrics_listen: str = "127.0.0.1:9465"
    """KEYWARD_ZEN_METRICS_LISTEN, host:port of the Prometheus endpoint ("" disables)."""

    ca_addr: str = "127.0.0.1:50051"
    """KEYWARD_CA_ADDR, the Central Authority (gRPC over mTLS)."""

    tls_cert_file: str = ""
    """KEYWARD_ZEN_TLS_CERT_FILE: this ZEN's pool identity (spiffe://.../zen-pool/NAME)."""

    tls_key_file: str = ""
    """KEYWARD_ZEN_TLS_KEY_FILE: its key."""

    ca_trust_file: str = ""
    """KEYWARD_ZEN_CA_TRUST_FILE: trust anchor of the CA's server certificate."""

    master_secret_file: str = ""
    """KEYWARD_MASTER_SECRET_FILE: the secret from which key passwords are derived."""

    extra_roots_file: str = ""
    """KEYWARD_ZEN_EXTRA_ROOTS_FILE: PEM roots trusted for origins besides the system store."""

    resolve: Mapping[str, str] = field(default_factory=dict)
    """KEYWARD_ZEN_RESOLVE, "host=ip,host=ip": fixed name resolution (labs, tests), like curl --resolve."""

    pac_proxies: tuple[str, ...] = ()
    """KEYWARD_ZEN_PAC_PROXIES, "host:port,host:port": the ZENs the PAC file lists
    (default: this ZEN's own address)."""

    leaf_cache_size: int = 1000
    """KEYWARD_ZEN_LEAF_CACHE, certificates (default 1000): minted leaves kept in RAM (LRU)."""

    leaf_hours: int = 24
    """KEYWARD_ZEN_LEAF_HOURS (default 24): validity of minted leaves and life of a leaf key."""

    max_keys: int = 16
    """KEYWARD_ZEN_MAX_KEYS, org keys (default 16): keys open at once, each in its own signer process
    with locked memory (about 40 MB). The least recently used is dropped to open another, so
    a flood of orgs cannot pin this ZEN's RAM."""

    require_mlock: bool = True
    """KEYWARD_REQUIRE_MLOCK (default true): refuse to start if key memory cannot be locked."""


def _int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name) or ""
    if not raw:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise ZenConfigError(f"{name}={raw!r} is not an integer") from None
    if not lo <= v <= hi:
        raise ZenConfigError(f"{name}={v} is out of range {lo}..{hi}")
    return v


def from_env(env: Mapping[str, str] | None = None) -> ZenConfig:
    env = os.environ if env is None else env
    missing = [n for n in ("KEYWARD_ZEN_TLS_CERT_FILE", "KEYWARD_ZEN_TLS_KEY_FILE", "KEYWARD_ZEN_CA_TRUST_FILE",
                           "KEYWARD_MASTER_SECRET_FILE") if not env.get(n)]
    if missing:
        raise ZenConfigError(f"missing required settings: {', '.join(missing)}")
    resolve: dict[str, str] = {}
    for item in filter(None, (env.get("KEYWARD_ZEN_RESOLVE") or "").split(",")):
        host, sep, ip = item.partition("=")
        if not sep:
            raise ZenConfigError(f"KEYWARD_ZEN_RESOLVE entry {item!r} is not host=ip")
        resolve[host.strip().lower()] = ip.strip()
    return ZenConfig(
        listen=env.get("KEYWARD_ZEN_LISTEN") or "127.0.0.1:8080",
        metrics_listen=env.get("KEYWARD_ZEN_METRICS_LISTEN", "127.0.0.1:9465"),
        ca_addr=env.get("KEYWARD_CA_ADDR") or "127.0.0.1:50051",
        tls_cert_file=env["KEYWARD_ZEN_TLS_CERT_FILE"],
        tls_key_file=env["KEYWARD_ZEN_TLS_KEY_FILE"],
        ca_trust_file=env["KEYWARD_ZEN_CA_TRUST_FILE"],
        master_secret_file=env["KEYWARD_MASTER_SECRET_FILE"],
        extra_roots_file=env.get("KEYWARD_ZEN_EXTRA_ROOTS_FILE", ""),
        resolve=resolve,
        pac_proxies=tuple(x.strip() for x in (env.get("KEYWARD_ZEN_PAC_PROXIES") or "").split(",") if x.strip()),
        leaf_cache_size=_int(env, "KEYWARD_ZEN_LEAF_CACHE", 1000, 1, 1_000_000),
        leaf_hours=_int(env, "KEYWARD_ZEN_LEAF_HOURS", 24, 1, 24 * 30),
        max_keys=_int(env, "KEYWARD_ZEN_MAX_KEYS", 16, 1, 10000),
        require_mlock=(env.get("KEYWARD_REQUIRE_MLOCK", "true").lower() not in ("0", "false", "no", "off")),
    )
