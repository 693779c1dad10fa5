"""Organization policy: a plain value with validation (pure).

A policy that contradicts itself is refused with a message naming the
conflicting entries, so a person can fix it. Validation is linear in the
policy's size (sets and sorted sweeps, never entry against entry: a
1,000-entry policy once cost 0.88 s of the CA's event loop), and bounded:
MAX_ENTRIES per list and MAX_TOTAL_BYTES in all.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from common.policy import DEFAULT_IDLE_SECONDS, PatternSet, host_pattern
from control_plane.errors import InvalidArgument, show
from keylib import proxyauth
from keylib.names import NameConstraints

MIN_IDLE_SECONDS = 10
MAX_IDLE_SECONDS = 86400
MAX_ENTRIES = 1000
MAX_TOTAL_BYTES = 256 * 1024
"""All list entries of a policy together, in bytes (each event carries the policy)."""

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
    proxy_credential_verifiers: tuple[str, ...] = ()
    """Verifiers (keylib.proxyauth) of the secrets the org's users give a ZEN as ``org:secret``.
    Several, so a credential can be rotated without a gap; none: source networks only."""
    permitted_dns_subtrees: tuple[str, ...] = ()
    """Name constraints (RFC 5280) the org's intermediate must carry: when any, it may only vouch
    for these domains and their subdomains."""
    excluded_dns_subtrees: tuple[str, ...] = ()
    """Domains (and subdomains) the intermediate must never vouch for, e.g. banks: a stolen
    intermediate is worthless for them, and no ZEN mints for them."""

    def to_json(self) -> dict[str, Any]:
        # Field by field, not dataclasses.asdict: that deep-copies every entry, which for a
        # 4,000-entry policy cost milliseconds of the event loop on each update.
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        d["fail_mode"] = self.fail_mode.value
        for k in _LISTS:
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
            proxy_credential_verifiers=tuple(d.get("proxy_credential_verifiers", ())),
            permitted_dns_subtrees=tuple(d.get("permitted_dns_subtrees", ())),
            excluded_dns_subtrees=tuple(d.get("excluded_dns_subtrees", ())),
        )

    @property
    def name_constraints(self) -> NameConstraints | None:
        """What the org's intermediate must carry (None: no NameConstraints extension)."""
        if not self.permitted_dns_subtrees and not self.excluded_dns_subtrees:
            return None
        return NameConstraints(self.permitted_dns_subtrees, self.excluded_dns_subtrees)


_LISTS = ("location_cidrs", "blocked_hosts", "blocked_url_prefixes", "do_not_inspect_hosts",
          "proxy_credential_verifiers", "permitted_dns_subtrees", "excluded_dns_subtrees")
MAX_VERIFIERS = 8
MAX_SUBTREES = 64


def _host(h: str, what: str) -> str:
    v = host_pattern(h)
    if v is None:
        raise InvalidArgument(f"{what}: {show(h)} is not a host name (use e.g. example.com or *.example.com)")
    return v


def _subtree(h: str, what: str) -> str:
    v = _host(h.removeprefix("."), what)
    if v.startswith("*."):
        raise InvalidArgument(f"{what}: {show(h)}: a DNS subtree is a domain (example.com covers its "
                              "subdomains); no wildcard")
    return v


def _overlap(nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> tuple[object, object] | None:
    """Two networks that overlap, if any (a sorted sweep: O(n log n))."""
    ordered = sorted(nets, key=lambda n: (n.version, int(n.network_address), -n.prefixlen))
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.version == b.version and int(b.network_address) <= int(a.broadcast_address):
            return a, b
    return None


def validate(
    *,
    private_zen_only: bool,
    fail_mode: FailMode,
    key_idle_timeout_seconds: int,
    location_cidrs: list[str],
    blocked_hosts: list[str],
    blocked_url_prefixes: list[str],
    do_not_inspect_hosts: list[str],
    proxy_credential_verifiers: list[str] = [],  # noqa: B006 (never mutated)
    permitted_dns_subtrees: list[str] = [],  # noqa: B006
    excluded_dns_subtrees: list[str] = [],  # noqa: B006
) -> Policy:
    """Normalize and check a policy; raise InvalidArgument naming the problem."""
    idle = key_idle_timeout_seconds or DEFAULT_IDLE_SECONDS
    if not MIN_IDLE_SECONDS <= idle <= MAX_IDLE_SECONDS:
        raise InvalidArgument(
            f"policy.key_idle_timeout_seconds={idle} is out of range "
            f"{MIN_IDLE_SECONDS}..{MAX_IDLE_SECONDS} (0 means the default {DEFAULT_IDLE_SECONDS})"
        )
    total = 0
    for name, seq in (("location_cidrs", location_cidrs), ("blocked_hosts", blocked_hosts),
                      ("blocked_url_prefixes", blocked_url_prefixes),
                      ("do_not_inspect_hosts", do_not_inspect_hosts)):
        if len(seq) > MAX_ENTRIES:
            raise InvalidArgument(f"policy.{name} has {len(seq)} entries; at most {MAX_ENTRIES}")
        total += sum(len(x) for x in seq)
    for name, seq, most in (("proxy_credential_verifiers", proxy_credential_verifiers, MAX_VERIFIERS),
                            ("permitted_dns_subtrees", permitted_dns_subtrees, MAX_SUBTREES),
                            ("excluded_dns_subtrees", excluded_dns_subtrees, MAX_SUBTREES)):
        if len(seq) > most:
            raise InvalidArgument(f"policy.{name} has {len(seq)} entries; at most {most}")
        total += sum(len(x) for x in seq)
    if total > MAX_TOTAL_BYTES:
        raise InvalidArgument(f"policy lists hold {total} bytes in all; at most {MAX_TOTAL_BYTES}: "
                              "use wildcards (*.example.com) or shorter prefixes")
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for c in location_cidrs:
        try:
            nets.append(ipaddress.ip_network(c.strip(), strict=True))
        except ValueError:
            raise InvalidArgument(
                f"policy.location_cidrs: {show(c)} is not a network in CIDR form with host bits zero "
                "(e.g. 10.1.0.0/16)"
            ) from None
    pair = _overlap(nets)
    if pair is not None:
        raise InvalidArgument(f"policy.location_cidrs: {pair[0]} and {pair[1]} overlap; list each network once")
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
    # The same rule as entry against entry (a do-not-inspect pattern and a blocked one that match
    # each other's names), through sets of exact names and wildcard suffixes.
    blocked_names, dni_names = PatternSet(blocked), PatternSet(dni)
    for d in dni:
        b = blocked_names.match(d.removeprefix("*."))
        if b is None:
            continue  # a blocked name under a do-not-inspect wildcard is found from the other side below
        raise InvalidArgument(
            f"policy contradicts itself: {d!r} is do-not-inspect and {b!r} is blocked; "
            "a host cannot be both tunnelled uninspected and blocked")
    for b in blocked:
        d2 = dni_names.match(b.removeprefix("*."))
        if d2 is not None:
            raise InvalidArgument(
                f"policy contradicts itself: {d2!r} is do-not-inspect and {b!r} is blocked; "
                "a host cannot be both tunnelled uninspected and blocked")
    for p in prefixes:
        d3 = dni_names.match(p.split("/", 1)[0])
        if d3 is not None:
            raise InvalidArgument(
                f"policy contradicts itself: URL prefix {show(p)} is blocked but its host is "
                f"do-not-inspect ({d3!r}); URLs of uninspected hosts cannot be seen")
    verifiers = []
    for v in proxy_credential_verifiers:
        try:
            proxyauth.parse(v.strip())
        except proxyauth.VerifierError as e:
            raise InvalidArgument(f"policy.proxy_credential_verifiers: {e}") from None
        verifiers.append(v.strip())
    permitted = sorted({_subtree(h, "policy.permitted_dns_subtrees") for h in permitted_dns_subtrees})
    excluded = sorted({_subtree(h, "policy.excluded_dns_subtrees") for h in excluded_dns_subtrees})
    both = set(permitted) & set(excluded)
    if both:
        raise InvalidArgument(f"policy: {sorted(both)[0]!r} is both a permitted and an excluded DNS subtree")
    return Policy(
        private_zen_only=private_zen_only,
        fail_mode=fail_mode,
        key_idle_timeout_seconds=idle,
        location_cidrs=tuple(str(n) for n in nets),
        blocked_hosts=tuple(blocked),
        blocked_url_prefixes=tuple(sorted(set(prefixes))),
        do_not_inspect_hosts=tuple(dni),
        proxy_credential_verifiers=tuple(dict.fromkeys(verifiers)),
        permitted_dns_subtrees=tuple(permitted),
        excluded_dns_subtrees=tuple(excluded),
    )
