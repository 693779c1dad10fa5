"""Organization policy: a plain value with validation (pure).

A policy that contradicts itself is refused with a message naming the
conflicting entries, so a person can fix it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from control_plane.errors import InvalidArgument, show

DEFAULT_IDLE_SECONDS = 600
MIN_IDLE_SECONDS = 10
MAX_IDLE_SECONDS = 86400
MAX_ENTRIES = 1000

_HOST_RE = re.compile(r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class FailMode(Enum):
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class Policy:
    private_zen_only: bool = False
    fail_mode: FailMode = FailMode.OPEN
    key_idle_timeout_seconds: int = DEFAULT_IDLE_SECONDS
    location_cidrs: tuple[str, ...] = ()
    blocked_hosts: tuple[str, ...] = ()
    blocked_url_prefixes: tuple[str, ...] = ()
    do_not_inspect_hosts: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["fail_mode"] = self.fail_mode.value
        for k in ("location_cidrs", "blocked_hosts", "blocked_url_prefixes", "do_not_inspect_hosts"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Policy:
        return cls(
            private_zen_only=bool(d.get("private_zen_only", False)),
            fail_mode=FailMode(d.get("fail_mode", "open")),
            key_idle_timeout_seconds=int(d.get("key_idle_timeout_seconds", DEFAULT_IDLE_SECONDS)),
            location_cidrs=tuple(d.get("location_cidrs", ())),
            blocked_hosts=tuple(d.get("blocked_hosts", ())),
            blocked_url_prefixes=tuple(d.get("blocked_url_prefixes", ())),
            do_not_inspect_hosts=tuple(d.get("do_not_inspect_hosts", ())),
        )


def _host(h: str, what: str) -> str:
    v = h.strip().lower().rstrip(".")
    if not v or len(v) > 253 or not _HOST_RE.match(v):
        raise InvalidArgument(f"{what}: {show(h)} is not a host name (use e.g. example.com or *.example.com)")
    return v


def _matches(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) or host == pattern[2:]
    return host == pattern


def validate(
    *,
    private_zen_only: bool,
    fail_mode: FailMode,
    key_idle_timeout_seconds: int,
    location_cidrs: list[str],
    blocked_hosts: list[str],
    blocked_url_prefixes: list[str],
    do_not_inspect_hosts: list[str],
) -> Policy:
    """Normalize and check a policy; raise InvalidArgument naming the problem."""
    idle = key_idle_timeout_seconds or DEFAULT_IDLE_SECONDS
    if not MIN_IDLE_SECONDS <= idle <= MAX_IDLE_SECONDS:
        raise InvalidArgument(
            f"policy.key_idle_timeout_seconds={idle} is out of range "
            f"{MIN_IDLE_SECONDS}..{MAX_IDLE_SECONDS} (0 means the default {DEFAULT_IDLE_SECONDS})"
        )
    for name, seq in (("location_cidrs", location_cidrs), ("blocked_hosts", blocked_hosts),
                      ("blocked_url_prefixes", blocked_url_prefixes),
                      ("do_not_inspect_hosts", do_not_inspect_hosts)):
        if len(seq) > MAX_ENTRIES:
            raise InvalidArgument(f"policy.{name} has {len(seq)} entries; at most {MAX_ENTRIES}")
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for c in location_cidrs:
        try:
            nets.append(ipaddress.ip_network(c.strip(), strict=True))
        except ValueError:
            raise InvalidArgument(
                f"policy.location_cidrs: {show(c)} is not a network in CIDR form with host bits zero "
                "(e.g. 10.1.0.0/16)"
            ) from None
    for i, net_a in enumerate(nets):
        for net_b in nets[i + 1:]:
            if net_a.version == net_b.version and net_a.overlaps(net_b):
                raise InvalidArgument(
                    f"policy.location_cidrs: {net_a} and {net_b} overlap; list each network once")
    blocked = sorted({_host(h, "policy.blocked_hosts") for h in blocked_hosts})
    dni = sorted({_host(h, "policy.do_not_inspect_hosts") for h in do_not_inspect_hosts})
    prefixes: list[str] = []
    for p in blocked_url_prefixes:
        v = p.strip()
        host, _, path = v.partition("/")
        _host(host, "policy.blocked_url_prefixes")
        if any(ch.isspace() for ch in v) or len(v) > 2048:
            raise InvalidArgument(f"policy.blocked_url_prefixes: {show(p)} is not a host/path prefix")
        prefixes.append(host.lower() + ("/" + path if path or v.endswith("/") else ""))
    for d in dni:
        for b in blocked:
            if _matches(b, d.lstrip("*.")) or _matches(d, b.lstrip("*.")):
                raise InvalidArgument(
                    f"policy contradicts itself: {d!r} is do-not-inspect and {b!r} is blocked; "
                    "a host cannot be both tunnelled uninspected and blocked"
                )
        for p in prefixes:
            ph = p.split("/", 1)[0]
            if _matches(d, ph):
                raise InvalidArgument(
                    f"policy contradicts itself: URL prefix {show(p)} is blocked but its host is "
                    f"do-not-inspect ({d!r}); URLs of uninspected hosts cannot be seen"
                )
    return Policy(
        private_zen_only=private_zen_only,
        fail_mode=fail_mode,
        key_idle_timeout_seconds=idle,
        location_cidrs=tuple(str(n) for n in nets),
        blocked_hosts=tuple(blocked),
        blocked_url_prefixes=tuple(sorted(set(prefixes))),
        do_not_inspect_hosts=tuple(dni),
    )
