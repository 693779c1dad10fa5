"""common.policy: the host patterns both planes match the same way, and the idle default."""

from __future__ import annotations

import itertools

import pytest

from common.policy import DEFAULT_IDLE_SECONDS, PatternSet, host_pattern, pattern_matches

PATTERNS = ["a.com", "*.a.com", "b.a.com", "*.b.a.com", "ba.com", "*.ba.com", "com", "*.com", "x.org"]
HOSTS = ["a.com", "b.a.com", "c.b.a.com", "ba.com", "xa.com", "a.com.evil", "com", "x.org", "A.COM.", "b.a.com."]


@pytest.mark.parametrize("pattern,host", list(itertools.product(PATTERNS, HOSTS)))
def test_the_indexed_set_and_the_rule_agree(pattern: str, host: str) -> None:
    """The CA finds contradictions with PatternSet, the ZEN decides with it; pattern_matches is the
    rule in one line. They agree on every pattern and host."""
    assert (PatternSet([pattern]).match(host) == pattern) is pattern_matches(pattern, host)


def test_a_list_matches_its_most_specific_pattern_and_nothing_across_a_label() -> None:
    s = PatternSet(["*.bank.example", "www.bank.example"])
    assert s.match("www.bank.example") == "www.bank.example"
    assert s.match("api.bank.example") == "*.bank.example" and s.match("bank.example") == "*.bank.example"
    assert s.match("evilbank.example") is None


@pytest.mark.parametrize("raw,want", [
    ("Example.COM.", "example.com"), (" *.example.com ", "*.example.com"), ("a-1.example", "a-1.example"),
    ("*.*.example.com", None), ("ex ample.com", None), ("-a.com", None), ("a..com", None), ("", None),
    ("example.com\n", "example.com"), ("a" * 64 + ".com", None), ("*", None),
])
def test_a_pattern_has_the_form_of_a_host_name(raw: str, want: str | None) -> None:
    assert host_pattern(raw) == want


def test_the_idle_default_is_one_number_for_the_ca_the_zen_and_the_cli() -> None:
    from control_plane.adminctl import policy as cli
    from control_plane.policy import Policy, validate
    from data_plane.ca_client import policy_from_pb
    from data_plane.policy import OrgPolicy
    from protos.keyward.v1 import keyward_pb2 as pb

    assert DEFAULT_IDLE_SECONDS == 600
    assert Policy().key_idle_timeout_seconds == DEFAULT_IDLE_SECONDS == OrgPolicy("acme").idle_seconds
    assert policy_from_pb("acme", pb.Policy(), 1).idle_seconds == DEFAULT_IDLE_SECONDS
    assert cli.DEFAULT_IDLE_SECONDS is DEFAULT_IDLE_SECONDS
    from control_plane.policy import FailMode
    assert validate(private_zen_only=False, fail_mode=FailMode.OPEN, key_idle_timeout_seconds=0, location_cidrs=[],
                    blocked_hosts=[], blocked_url_prefixes=[], do_not_inspect_hosts=[]
                    ).key_idle_timeout_seconds == DEFAULT_IDLE_SECONDS
