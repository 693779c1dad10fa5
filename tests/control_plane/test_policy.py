"""control_plane.policy: normalization and self-contradiction checks."""

from __future__ import annotations

from typing import Any

import pytest

from control_plane.errors import InvalidArgument
from control_plane.policy import FailMode, Policy, validate


def _v(**kw: Any) -> Policy:
    base: dict[str, Any] = dict(private_zen_only=False, fail_mode=FailMode.OPEN, key_idle_timeout_seconds=0,
                                location_cidrs=[], blocked_hosts=[], blocked_url_prefixes=[],
                                do_not_inspect_hosts=[])
    base.update(kw)
    return validate(**base)


def test_defaults_and_normalization() -> None:
    p = _v(blocked_hosts=["Gambling.Example.", "gambling.example"], location_cidrs=["10.1.0.0/16"],
           blocked_url_prefixes=["News.example/sport"])
    assert p.key_idle_timeout_seconds == 600
    assert p.blocked_hosts == ("gambling.example",)
    assert p.blocked_url_prefixes == ("news.example/sport",)
    assert Policy.from_json(p.to_json()) == p


@pytest.mark.parametrize("kw,msg", [
    ({"key_idle_timeout_seconds": 5}, "out of range"),
    ({"key_idle_timeout_seconds": 90000}, "out of range"),
    ({"location_cidrs": ["10.0.0.0/8", "10.2.0.0/16"]}, "overlap"),
    ({"location_cidrs": ["nonsense"]}, "CIDR"),
    ({"blocked_hosts": ["bad host"]}, "not a host name"),
    ({"blocked_hosts": ["a.example"], "do_not_inspect_hosts": ["a.example"]}, "contradicts"),
    ({"blocked_hosts": ["*.example"], "do_not_inspect_hosts": ["bank.example"]}, "contradicts"),
    ({"blocked_url_prefixes": ["bank.example/x"], "do_not_inspect_hosts": ["bank.example"]}, "contradicts"),
    ({"blocked_hosts": ["x.example"] * 1001}, "at most 1000"),
])
def test_refusals(kw: dict[str, Any], msg: str) -> None:
    with pytest.raises(InvalidArgument, match=msg):
        _v(**kw)


def test_ipv4_and_ipv6_do_not_overlap() -> None:
    assert len(_v(location_cidrs=["10.0.0.0/8", "fd00::/8"]).location_cidrs) == 2
