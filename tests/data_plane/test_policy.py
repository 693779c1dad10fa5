"""data_plane.policy: the ZEN's decisions as plain values."""

from __future__ import annotations

from data_plane.policy import Action, OrgPolicy, connect_action, org_for
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
