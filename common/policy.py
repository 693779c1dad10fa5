"""What both planes read of an org's policy the same way: the idle default, and the host
patterns of its lists (blocked hosts, do-not-inspect hosts, the host of a blocked URL prefix).

A host pattern is a host name (``example.com``: that name only) or a wildcard
(``*.example.com``: ``example.com`` itself and every name below it, at any depth). The CA
checks a pattern's form (:func:`host_pattern`) and finds contradictions between lists with
:class:`PatternSet`; the ZEN decides with :func:`pattern_matches`. The two give the same
answer for every pattern and host (a test holds them to it).

A certificate's wildcard name is another rule on purpose (RFC 6125: one left-most label,
never the domain itself): ``data_plane.policy.cert_name_covers``.
"""

from __future__ import annotations

import re

DEFAULT_IDLE_SECONDS = 600
"""What ``key_idle_timeout_seconds`` 0 (unset) means: a ZEN drops an org's key after this many
seconds unused. The CA stores it in place of 0; a ZEN reads 0 (from an older CA) as it."""

_HOST_PATTERN = re.compile(r"(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def normalize_host(host: str) -> str:
    """A host name as patterns are matched against it: lowercase, without a trailing dot."""
    return host.strip().lower().rstrip(".")


def host_pattern(value: str) -> str | None:
    """The pattern ``value`` stands for (normalised), or None when it is not one."""
    v = normalize_host(value)
    if not v or len(v) > 253 or not _HOST_PATTERN.fullmatch(v):
        return None
    return v


def pattern_matches(pattern: str, host: str) -> bool:
    """Whether ``host`` is one of the names a (normalised) ``pattern`` stands for."""
    host = normalize_host(host)
    if pattern.startswith("*."):
        return host == pattern[2:] or host.endswith(pattern[1:])
    return host == pattern


class PatternSet:
    """The patterns of one list, indexed: :meth:`match` is :func:`pattern_matches` against every
    pattern, in time linear in the host's labels, not in the list's length."""

    def __init__(self, patterns: list[str] | tuple[str, ...]) -> None:
        self.exact = {p: p for p in patterns if not p.startswith("*.")}
        self.wild = {p[2:]: p for p in patterns if p.startswith("*.")}

    def match(self, host: str) -> str | None:
        """The pattern of this list that ``host`` matches, if any: the exact name, or a wildcard
        on the host itself or one of its parent domains."""
        host = normalize_host(host)
        if host in self.exact:
            return self.exact[host]
        labels = host.split(".")
        for i in range(len(labels)):
            hit = self.wild.get(".".join(labels[i:]))
            if hit is not None:
                return hit
        return None
