"""The ZEN's configuration: read from the environment in one place.

Secrets come from ``*_FILE`` paths. Each field says its variable, unit, default and meaning in
its metadata: :func:`from_env` reads the variables named there, ``python -m data_plane --help``
prints :func:`settings_table` and README's "Configuration of the ZEN" is
:func:`settings_markdown` (a test keeps them equal).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from common.env import SettingError, address, boolean, event_loop, hostport, integer_in, log_level, text
from common.policy import PatternSet, host_pattern, normalize_host

ZenConfigError = SettingError
"""The ZEN's configuration is wrong; it refuses to start. The message names the setting."""


def _setting(env: str, meaning: str, *, default: Any = "", unit: str = "", shown: str | None = None,
             required: bool = False, factory: Callable[[], Any] | None = None) -> Any:
    md = {"env": env, "meaning": meaning, "unit": unit, "required": required,
          "shown": shown if shown is not None else ("(required)" if required else _show(default))}
    if factory is not None:
        return field(default_factory=factory, metadata=md)
    return field(default=default, metadata=md)


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v) if v not in ("", None) else "(none)"


@dataclass(frozen=True)
class ZenConfig:
    listen: str = _setting(
        "KEYWARD_ZEN_LISTEN", "the forward proxy (CONNECT, absolute http:// URIs, /proxy.pac); loopback by "
        "default", default="127.0.0.1:8080", unit="host:port")
    metrics_listen: str = _setting(
        "KEYWARD_ZEN_METRICS_LISTEN", "Prometheus /metrics and /healthz; empty disables", default="127.0.0.1:9465",
        unit="host:port")
    ca_addr: str = _setting(
        "KEYWARD_CA_ADDR", "the Central Authority (gRPC over mTLS)", default="127.0.0.1:50051", unit="host:port")
    tls_cert_file: str = _setting(
        "KEYWARD_ZEN_TLS_CERT_FILE", "this ZEN's identity toward the CA: its pool's certificate "
        "(spiffe://TRUST-DOMAIN/zen-pool/POOL)", unit="PEM file", required=True)
    tls_key_file: str = _setting(
        "KEYWARD_ZEN_TLS_KEY_FILE", "the private key of that certificate", unit="PEM file", required=True)
    ca_trust_file: str = _setting(
        "KEYWARD_ZEN_CA_TRUST_FILE", "trust anchor of the CA's server certificate", unit="PEM file", required=True)
    master_secret_file: str = _setting(
        "KEYWARD_MASTER_SECRET_FILE", "the CA's master secret (>= 32 random bytes), from which key passwords are "
        "derived; its check value must match the CA's, or the ZEN refuses to start", unit="file", required=True)
    extra_roots_file: str = _setting(
        "KEYWARD_ZEN_EXTRA_ROOTS_FILE", "roots trusted for origins besides the system store", unit="PEM file")
    resolve: Mapping[str, str] = _setting(
        "KEYWARD_ZEN_RESOLVE", "fixed name resolution of origins (labs, tests), like curl --resolve; a host "
        "*.example.test stands for example.test and every name below it (an exact entry wins, then the longest "
        "domain)", unit="host=ip,...", factory=dict, shown="(DNS)")
    pac_proxies: tuple[str, ...] = _setting(
        "KEYWARD_ZEN_PAC_PROXIES", "the ZENs /proxy.pac lists", unit="host:port,...", default=(),
        shown="(this ZEN)")
    leaf_cache_size: int = _setting(
        "KEYWARD_ZEN_LEAF_CACHE", "minted leaf certificates kept in RAM (LRU)", default=1000, unit="certificates")
    leaf_hours: int = _setting(
        "KEYWARD_ZEN_LEAF_HOURS", "validity of minted leaves and life of a leaf key", default=24, unit="hours")
    max_keys: int = _setting(
        "KEYWARD_ZEN_MAX_KEYS", "org keys open at once, each in its own signer process with locked memory (about "
        "40 MB); the least recently used is dropped to open another, so a flood of orgs cannot pin this ZEN's RAM",
        default=16, unit="keys")
    origin_pool: int = _setting(
        "KEYWARD_ZEN_ORIGIN_POOL", "idle origin connections kept for reuse, in all: a client connection to a site "
        "this org's clients just used skips the origin's TCP connect and TLS handshake (most of the ZEN's CPU per "
        "new connection); only under the same org, host, port and verified name; 0 keeps none",
        default=256, unit="connections")
    origin_idle: int = _setting(
        "KEYWARD_ZEN_ORIGIN_IDLE", "how long an idle origin connection is kept (below most servers' keep-alive "
        "timeouts; a pooled connection its origin closed first is replaced, for a request without a body)",
        default=30, unit="seconds")
    origin_session_seconds: int = _setting(
        "KEYWARD_ZEN_ORIGIN_SESSIONS", "how long an origin's TLS session is kept for resumption, per org, host, "
        "port and name: a new origin connection (no idle one fits) resumes it instead of a full handshake, and "
        "the certificate the session holds is checked again for the name; never longer than the origin's ticket "
        "allows; 0 keeps none", default=600, unit="seconds")
    workers: int = _setting(
        "KEYWARD_ZEN_WORKERS", "processes that serve proxy connections, sharing the listening socket, so the ZEN "
        "uses more than one core; 1: this process serves them itself. With more, this process supervises: the "
        "org keys stay one signer process per org, here, which signs for every worker; each worker has its own "
        "leaf cache, leaf keys and origin connections, and metrics are summed over all", default=1, unit="processes")
    event_loop: str = _setting(
        "KEYWARD_ZEN_EVENT_LOOP", "uvloop (libuv; its TLS layer in Cython: about a quarter less CPU per intercepted "
        "new connection and a third less per keep-alive request than asyncio's own loop, bench/zen_cpu.py) or "
        "asyncio", default="uvloop", unit="uvloop/asyncio")
    require_mlock: bool = _setting(
        "KEYWARD_REQUIRE_MLOCK", "a key whose memory cannot be locked is not opened (its org's fail mode applies; "
        "/healthz says why)", default=True, unit="true/false")
    log_level: str = _setting(
        "KEYWARD_LOG_LEVEL", "JSON lines on stderr: DEBUG, INFO, WARNING or ERROR", default="INFO", unit="level")


def _resolve(name: str, raw: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in raw.split(","))):
        host, sep, ip = item.partition("=")
        if not sep or not host.strip():
            raise ZenConfigError(f"{name}: entry {item!r} is not host=ip")
        if "*" in host and host_pattern(host) is None:
            raise ZenConfigError(f"{name}: entry {item!r}: a wildcard is a first label *. before a domain "
                                 "(*.example.test)")
        try:
            ipaddress.ip_address(ip.strip())
        except ValueError:
            raise ZenConfigError(f"{name}: entry {item!r}: {ip.strip()!r} is not an IP address") from None
        out[normalize_host(host)] = ip.strip()
    return out


def resolved(table: Mapping[str, str], names: PatternSet, host: str) -> str | None:
    """The address ``KEYWARD_ZEN_RESOLVE`` gives ``host`` (``names``: the table's keys, indexed), if
    any: its exact entry, else the wildcard of the nearest domain (the policy's pattern rule,
    ``common.policy``: ``*.example.test`` covers example.test and every name below it)."""
    hit = names.match(host)
    return table[hit] if hit is not None else None


def _list(name: str, raw: str) -> tuple[str, ...]:
    return tuple(address(name, x) for x in raw.split(",") if x.strip())


_PARSE: dict[str, Callable[[str, str], Any]] = {
    "listen": hostport,
    "metrics_listen": hostport,
    "ca_addr": address,
    "resolve": _resolve,
    "pac_proxies": _list,
    "leaf_cache_size": integer_in(1, 1_000_000),
    "leaf_hours": integer_in(1, 24 * 30),
    "max_keys": integer_in(1, 10000),
    "origin_pool": integer_in(0, 100_000),
    "origin_idle": integer_in(1, 3600),
    "origin_session_seconds": integer_in(0, 86400),
    "require_mlock": boolean,
    "event_loop": event_loop,
    "workers": integer_in(1, 64),
    "log_level": log_level,
}
_EMPTY_MEANS_OFF = {"metrics_listen"}
"""Settings where an empty value is a value (disabled), not the default."""


def from_env(environ: Mapping[str, str] | None = None) -> ZenConfig:
    environ = os.environ if environ is None else environ
    missing = [f.metadata["env"] for f in fields(ZenConfig)
               if f.metadata["required"] and not environ.get(f.metadata["env"])]
    if missing:
        raise ZenConfigError(f"missing required settings: {', '.join(missing)} (python -m data_plane --help)")
    values: dict[str, Any] = {}
    for f in fields(ZenConfig):
        name = f.metadata["env"]
        raw = environ.get(name)
        if raw is None or (raw.strip() == "" and f.name not in _EMPTY_MEANS_OFF):
            continue  # the default (common.env.get's rule), except where empty is a value
        values[f.name] = _PARSE.get(f.name, text)(name, raw) if raw.strip() else ""
    return ZenConfig(**values)


def settings() -> list[tuple[str, str, str, str]]:
    """(variable, default, unit, meaning) of every setting, in the dataclass's order."""
    return [(f.metadata["env"], f.metadata["shown"], f.metadata["unit"], f.metadata["meaning"])
            for f in fields(ZenConfig)]


def settings_table(width: int = 100) -> str:
    """The settings as text, for ``--help``."""
    import textwrap

    out = []
    for env, shown, unit, meaning in settings():
        default = "required" if shown == "(required)" else f"default {shown}"
        out.append(f"  {env}  ({unit}; {default})" if unit else f"  {env}  ({default})")
        out.extend(textwrap.wrap(meaning, width - 6, initial_indent="      ", subsequent_indent="      ",
                                 break_on_hyphens=False))
    return "\n".join(out)


def settings_markdown() -> str:
    """The settings as README's table."""
    rows = ["| variable | default | unit | meaning |", "|---|---|---|---|"]
    for env, shown, unit, meaning in settings():
        rows.append(f"| `{env}` | {shown if shown.startswith('(') else f'`{shown}`'} | {unit} | {meaning} |")
    return "\n".join(rows)
