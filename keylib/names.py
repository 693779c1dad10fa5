"""Name constraints of an org's intermediate: the one definition of what a
constrained intermediate may vouch for (pure; RFC 5280 dNSName subtrees).

A subtree ``example.com`` covers ``example.com`` and every name below it.
The CA puts an org's constraints into the CSR and refuses an upload whose
certificate does not carry exactly them; a ZEN never mints a leaf for a
name they do not allow, reading them from the intermediate itself.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from cryptography import x509


def _within(host: str, subtree: str) -> bool:
    return host == subtree or host.endswith("." + subtree)


@dataclass(frozen=True)
class NameConstraints:
    permitted: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()

    def allows(self, host: str) -> bool:
        """Whether a leaf for ``host`` stays inside the constraints. An IP address is allowed
        only when nothing is permitted-only (dNSName subtrees say nothing about addresses,
        so a ZEN does not lean on them)."""
        h = host.lower().rstrip(".")
        try:
            ipaddress.ip_address(h)
            return not self.permitted
        except ValueError:
            pass
        if any(_within(h, e) for e in self.excluded):
            return False
        return not self.permitted or any(_within(h, p) for p in self.permitted)

    def extension(self) -> x509.NameConstraints:
        return x509.NameConstraints(
            permitted_subtrees=[x509.DNSName(p) for p in self.permitted] or None,
            excluded_subtrees=[x509.DNSName(e) for e in self.excluded] or None)

    @classmethod
    def of(cls, ext: x509.NameConstraints | None) -> NameConstraints | None:
        """The dNSName constraints of an extension; None when there is none. Other kinds of
        subtree are refused: keyward neither makes nor checks them."""
        if ext is None:
            return None
        permitted: list[str] = []
        excluded: list[str] = []
        for out, subtrees in ((permitted, ext.permitted_subtrees), (excluded, ext.excluded_subtrees)):
            for g in subtrees or ():
                if not isinstance(g, x509.DNSName):
                    raise ValueError(f"a name constraint of type {type(g).__name__}; only DNS names are supported")
                out.append(g.value.lower().lstrip(".").rstrip("."))
        return cls(tuple(sorted(set(permitted))), tuple(sorted(set(excluded))))

    @classmethod
    def of_certificate(cls, cert: x509.Certificate) -> NameConstraints | None:
        try:
            ext = cert.extensions.get_extension_for_class(x509.NameConstraints).value
        except x509.ExtensionNotFound:
            return None
        return cls.of(ext)
