"""data_plane.policy: the ZEN's decisions as plain values."""

from __future__ import annotations

import pytest

from data_plane.policy import Action, OrgPolicy, connect_action, host_matches, org_for
from keylib.names import NameConstraints


def test_hosts_outside_the_name_constraints_are_tunnelled_never_intercepted() -> None:
    p = OrgPolicy("acme", blocked_hosts=("*.casino.test",),
                  constraints=NameConstraints(excluded=("bank.test",)))
    assert connect_action(p, "shop.test", have_key=True) is Action.INTERCEPT
    assert connect_action(p, "www.bank.test", have_key=True) is Action.TUNNEL
    assert connect_action(p, "www.casino.test", have_key=True) is Action.BLOCK  # a block still blocks
    closed = OrgPolicy("acme", fail_closed=True, constraints=NameConstraints(permitted=("corp.test",)))
    assert connect_action(closed, "mail.corp.test", have_key=False) is Action.REFUSE
    assert connect_action(closed, "elsewhere.test", have_key=True) is Action.TUNNEL


def test_an_org_is_chosen_by_network_only_never_by_a_name() -> None:
    pols = {"a": OrgPolicy("a", location_cidrs=("10.0.0.0/8",)), "b": OrgPolicy("b", location_cidrs=("10.1.0.0/16",))}
    assert org_for(pols, "10.1.2.3") == "b"  # the most specific network
    assert org_for(pols, "10.9.0.1") == "a"
    assert org_for(pols, "192.0.2.1") is None  # then the caller must authenticate
    assert org_for(pols, "not-an-ip") is None


@pytest.mark.parametrize("host,hit", [
    ("bank.example", True),            # the wildcard covers the domain itself
    ("www.bank.example", True),
    ("a.b.bank.example", True),
    ("WWW.Bank.Example.", True),       # case and a trailing dot do not escape it
    ("evilbank.example", False),       # a label boundary, not a string suffix
    ("www.evilbank.example", False),
    ("bank.example.evil", False),
    ("example", False),
])
def test_a_wildcard_matches_at_label_boundaries_only(host: str, hit: bool) -> None:
    assert host_matches("*.bank.example", host) is hit
    p = OrgPolicy("acme", blocked_hosts=("*.casino.example",), do_not_inspect_hosts=("*.bank.example",))
    assert connect_action(p, host, have_key=True) is (Action.TUNNEL if hit else Action.INTERCEPT)
    casino = host.lower().replace("bank", "casino")
    assert connect_action(p, casino, have_key=True) is (Action.BLOCK if hit else Action.INTERCEPT)
