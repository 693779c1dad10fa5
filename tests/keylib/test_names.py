"""keylib.names: what a constrained intermediate may vouch for (RFC 5280 dNSName subtrees)."""

from __future__ import annotations

import pytest
from cryptography import x509

from keylib.names import NameConstraints


@pytest.mark.parametrize("host, ok", [
    ("example.com", True), ("www.example.com", True), ("a.b.example.com", True),
    ("badexample.com", False),  # a suffix of the string, not of the labels
    ("bank.example.com", False), ("x.bank.example.com", False), ("BANK.example.com.", False),
    ("other.org", False), ("10.0.0.1", False), ("::1", False),
])
def test_permitted_and_excluded_subtrees(host: str, ok: bool) -> None:
    nc = NameConstraints(permitted=("example.com",), excluded=("bank.example.com",))
    assert nc.allows(host) is ok


def test_excluded_only_allows_everything_else_addresses_included() -> None:
    nc = NameConstraints(excluded=("bank.test",))
    assert nc.allows("shop.test") and nc.allows("10.0.0.1") and not nc.allows("www.bank.test")


def test_the_extension_round_trips_and_other_kinds_are_refused() -> None:
    nc = NameConstraints(permitted=("a.test", "b.test"), excluded=("x.a.test",))
    assert NameConstraints.of(nc.extension()) == nc
    assert NameConstraints.of(None) is None
    ip = x509.NameConstraints(permitted_subtrees=[x509.IPAddress(__import__("ipaddress").ip_network("10.0.0.0/8"))],
                              excluded_subtrees=None)
    with pytest.raises(ValueError, match="only DNS names"):
        NameConstraints.of(ip)
