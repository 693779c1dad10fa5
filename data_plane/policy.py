"""The ZEN's policy decisions (pure): which org a connection belongs to,
and what to do with a CONNECT or a request.

No sockets, no protobuf: plain values in, a decision out.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import Enum

from common.policy import DEFAULT_IDLE_SECONDS, PatternSet
from keylib.names import NameConstraints


class Action(Enum):
    INTERCEPT = "intercept"  # decrypt with a minted certificate and inspect
    TUNNEL = "tunnel"        # relay bytes, no decryption
    BLOCK = "block"          # 403 page
    REFUSE = "refuse"        # no key, fail-closed org: 503 page


@dataclass(frozen=True)
class OrgPolicy:
    org_id: str
    fail_closed: bool = False
    idle_seconds: int = DEFAULT_IDLE_SECONDS
    location_cidrs: tuple[str, ...] = ()
    blocked_hosts: tuple[str, ...] = ()
    blocked_url_prefixes: tuple[str, ...] = ()
    do_not_inspect_hosts: tuple[str, ...] = ()
    version: int = 0
    proxy_verifiers: tuple[str, ...] = ()
    """keylib.proxyauth verifiers of the org's proxy credentials (none: source networks only)."""
    constraints: NameConstraints | None = None
    """The name constraints the org's intermediate carries: hosts outside are never intercepted."""
    nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(default=(), compare=False)
    blocked: PatternSet = field(default=PatternSet(()), compare=False, repr=False)
    """``blocked_hosts`` indexed (the CA's own matcher, common.policy): a lookup per connection
    costs the host's labels, not the list's length."""
    uninspected: PatternSet = field(default=PatternSet(()), compare=False, repr=False)
    """``do_not_inspect_hosts`` indexed."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "nets", tuple(ipaddress.ip_network(c) for c in self.location_cidrs))
        object.__setattr__(self, "blocked", PatternSet(self.blocked_hosts))
        object.__setattr__(self, "uninspected", PatternSet(self.do_not_inspect_hosts))


def cert_name_covers(san: str, host: str) -> bool:
    """Whether a certificate's DNS name (or IP address) covers ``host`` (already normalised), as a TLS
    client checks it: a wildcard stands for exactly one left-most label, never for the domain itself
    nor for deeper names (RFC 6125 6.4.3; unlike the policy's patterns, ``common.policy``)."""
    san = san.lower().rstrip(".")
    if san.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == san[2:]
    return host == san


def org_for(policies: dict[str, OrgPolicy], source_ip: str) -> str | None:
    """The org whose location networks hold ``source_ip`` (most specific wins), if any; otherwise
    the caller must authenticate (proxyauth)."""
    try:
        ip = ipaddress.ip_address(source_ip)
    except ValueError:
        ip = None
    best: tuple[int, str] | None = None
    if ip is not None:
        for p in policies.values():
            for n in p.nets:
                if ip.version == n.version and ip in n and (best is None or n.prefixlen > best[0]):
                    best = (n.prefixlen, p.org_id)
    return best[1] if best else None


def connect_action(p: OrgPolicy, host: str, have_key: bool) -> Action:
    if p.blocked.match(host) is not None:
        return Action.BLOCK
    if p.uninspected.match(host) is not None:
        return Action.TUNNEL
    if p.constraints is not None and not p.constraints.allows(host):
        return Action.TUNNEL  # no leaf may be minted for it: as do-not-inspect
    if have_key:
        return Action.INTERCEPT
    return Action.REFUSE if p.fail_closed else Action.TUNNEL


_UNRESERVED_OR_SLASH = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~/")
"""Decoded before matching; "/" too, since many origins decode ``%2F`` into a separator."""


def normalize_path(path: str) -> str:
    """The path as the origin will understand it, for prefix matching (RFC 3986 section 6.2.2):
    percent-encoded unreserved characters and slashes decoded (``/%70rivate`` is ``/private``),
    dot segments removed (``/public/../private``), empty segments kept; letter case kept (paths
    are case-sensitive). The query stays as it is. Used only to match, never to forward."""
    path, q, query = path.partition("?")
    if "%" not in path and "/." not in path and not path.startswith("."):
        return path + q + query  # nothing to decode, no dot segment: as it is
    out, i = [], 0
    while i < len(path):
        c = path[i]
        if c == "%" and len(path) - i >= 3 and all(h in "0123456789abcdefABCDEF" for h in path[i + 1:i + 3]):
            ch = chr(int(path[i + 1:i + 3], 16))
            out.append(ch if ch in _UNRESERVED_OR_SLASH else "%" + path[i + 1:i + 3].upper())
            i += 3
        else:
            out.append(c)
            i += 1
    segments: list[str] = []
    parts = "".join(out).split("/")
    for n, seg in enumerate(parts):
        if seg == ".":
            if n == len(parts) - 1:
                segments.append("")
        elif seg == "..":
            if len(segments) > 1:
                segments.pop()
            if n == len(parts) - 1:
                segments.append("")
        else:
            segments.append(seg)
    return "/".join(segments) + q + query


def split_target(target: str) -> tuple[str | None, str]:
    """An HTTP/1.1 request target: (authority, path). The absolute form
    (``https://host/path``, which origins must accept) names its own authority."""
    scheme, sep, rest = target.partition("://")
    if sep and scheme.lower() in ("http", "https"):
        authority, slash, path = rest.partition("/")
        return authority.rpartition("@")[2], "/" + path if slash else "/"
    return None, target


def url_blocked(p: OrgPolicy, host: str, path: str) -> bool:
    url = host.lower().rstrip(".") + normalize_path(path)
    return any(url.startswith(prefix) for prefix in p.blocked_url_prefixes)


class Verdict(Enum):
    FORWARD = "forward"
    BLOCK = "block"            # 403 on this request; the connection goes on
    MISDIRECTED = "misdirected"  # 421: the client must open a connection of its own for this host


def request_verdict(p: OrgPolicy, name: str, names: tuple[str, ...], host: str, path: str) -> Verdict:
    """One request inside an intercepted connection to ``name``, whose origin proved ``names``.

    A client may send a request for another host on the same connection (HTTP/2 coalescing,
    or a Host header that differs): it is forwarded only if the origin's certificate covers
    that host and the host's own policy is to intercept; a blocked host or URL prefix gets a
    403; a host to tunnel (do not inspect, outside the name constraints) or not covered gets
    a 421, so the client opens a connection of its own, decided by its own CONNECT."""
    host = (host or name).lower().rstrip(".")
    if host != name and not any(cert_name_covers(n, host) for n in names):
        return Verdict.MISDIRECTED
    action = connect_action(p, host, have_key=True)
    if action is Action.BLOCK or url_blocked(p, host, path):
        return Verdict.BLOCK
    if action is not Action.INTERCEPT:
        return Verdict.MISDIRECTED
    return Verdict.FORWARD
