"""data_plane.policy: the ZEN's decisions as plain values."""

from __future__ import annotations

import pytest

from common.policy import pattern_matches
from data_plane.policy import Action, OrgPolicy, Verdict, connect_action, org_for, request_verdict
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
    assert pattern_matches("*.bank.example", host) is hit
    p = OrgPolicy("acme", blocked_hosts=("*.casino.example",), do_not_inspect_hosts=("*.bank.example",))
    assert connect_action(p, host, have_key=True) is (Action.TUNNEL if hit else Action.INTERCEPT)
    casino = host.lower().replace("bank", "casino")
    assert connect_action(p, casino, have_key=True) is (Action.BLOCK if hit else Action.INTERCEPT)


# -- request_verdict: one request inside an intercepted connection to NAME, whose origin proved NAMES

NAME = "www.good.test"
NAMES = ("www.good.test", "*.good.test", "api.other.test", "10.0.0.7")
ACME = OrgPolicy("acme", blocked_hosts=("*.casino.test", "bad.good.test"),
                 blocked_url_prefixes=("www.good.test/admin", "api.other.test/v1/secret"),
                 do_not_inspect_hosts=("bank.good.test",),
                 constraints=NameConstraints(excluded=("hr.good.test",)))


@pytest.mark.parametrize("host,path,verdict", [
    ("www.good.test", "/", Verdict.FORWARD),                       # the connection's own host
    ("", "/", Verdict.FORWARD),                                    # no host: the connection's
    ("api.other.test", "/v1/items", Verdict.FORWARD),              # covered by a name of the origin
    ("img.good.test", "/a.png", Verdict.FORWARD),                  # covered by its wildcard
    ("10.0.0.7", "/", Verdict.FORWARD),                            # an IP address the origin proved
    ("elsewhere.test", "/", Verdict.MISDIRECTED),                  # not covered: a connection of its own
    ("www.casino.test", "/", Verdict.MISDIRECTED),                 # not covered comes first, blocked or not
    ("bad.good.test", "/", Verdict.BLOCK),                         # covered, blocked host
    ("www.good.test", "/admin/users", Verdict.BLOCK),              # blocked URL prefix
    ("WWW.Good.Test.", "/admin", Verdict.BLOCK),
    ("api.other.test", "/v1/secret/x", Verdict.BLOCK),
    ("api.other.test", "/v1/secretary", Verdict.BLOCK),            # a prefix is a string prefix
    ("www.good.test", "/Admin", Verdict.FORWARD),                  # paths are case-sensitive
    ("bank.good.test", "/", Verdict.MISDIRECTED),                  # do not inspect: its own CONNECT tunnels it
    ("hr.good.test", "/", Verdict.MISDIRECTED),                    # outside the name constraints
    ("x.hr.good.test", "/", Verdict.MISDIRECTED),
])
def test_request_verdict(host: str, path: str, verdict: Verdict) -> None:
    assert request_verdict(ACME, NAME, NAMES, host, path) is verdict


@pytest.mark.parametrize("host", ["WWW.GOOD.TEST", "www.good.test.", "Www.Good.Test.", "IMG.good.test.",
                                  "API.OTHER.TEST"])
def test_request_verdict_normalises_case_and_a_trailing_dot(host: str) -> None:
    assert request_verdict(ACME, NAME, NAMES, host, "/") is Verdict.FORWARD
    assert request_verdict(OrgPolicy("acme", blocked_hosts=(host.lower().rstrip("."),)), NAME, NAMES, host,
                           "/") is Verdict.BLOCK


def test_request_verdict_origin_names_are_matched_case_insensitively() -> None:
    assert request_verdict(ACME, NAME, ("*.Good.TEST",), "cdn.good.test", "/") is Verdict.FORWARD
    assert request_verdict(ACME, NAME, ("API.Other.Test",), "api.other.test", "/") is Verdict.FORWARD


@pytest.mark.parametrize("host", [
    "good.test",          # a wildcard certificate does not cover its own domain (RFC 6125 6.4.3)
    "a.b.good.test",      # nor more than one label
    "evilgood.test",
    "good.test.evil",
])
def test_a_wildcard_origin_name_covers_exactly_one_label(host: str) -> None:
    assert request_verdict(ACME, NAME, ("*.good.test",), host, "/") is Verdict.MISDIRECTED
    assert request_verdict(ACME, NAME, ("*.good.test",), "one.good.test", "/") is Verdict.FORWARD


def test_request_verdict_with_a_fail_closed_org_and_no_names() -> None:
    closed = OrgPolicy("acme", fail_closed=True)
    assert request_verdict(closed, "shop.test", (), "shop.test", "/") is Verdict.FORWARD
    assert request_verdict(closed, "shop.test", (), "other.test", "/") is Verdict.MISDIRECTED
