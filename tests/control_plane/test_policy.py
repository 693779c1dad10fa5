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


def _pairwise_conflict(dni: list[str], blocked: list[str], prefixes: list[str]) -> bool:
    """The rule as it was first written, entry against entry (the reference)."""
    from common.policy import pattern_matches as m
    return any(m(b, d.lstrip("*.")) or m(d, b.lstrip("*.")) for d in dni for b in blocked) or \
        any(m(d, p.split("/", 1)[0]) for d in dni for p in prefixes)


def test_linear_contradiction_rule_equals_the_pairwise_one() -> None:
    import random

    from control_plane.errors import InvalidArgument
    from control_plane.policy import FailMode, validate
    rnd = random.Random(7)
    names = ["a.com", "b.a.com", "c.b.a.com", "ba.com", "x.org", "y.x.org", "com", "org"]  # ba.com: no label of a.com

    def pick() -> list[str]:
        return sorted({("*." if rnd.random() < 0.4 else "") + rnd.choice(names) for _ in range(rnd.randint(0, 3))})
    for _ in range(2000):
        dni, blocked = pick(), pick()
        prefixes = [rnd.choice(names) + "/p" for _ in range(rnd.randint(0, 2))]
        want = _pairwise_conflict(dni, blocked, prefixes)
        try:
            validate(private_zen_only=False, fail_mode=FailMode.OPEN, key_idle_timeout_seconds=0, location_cidrs=[],
                     blocked_hosts=blocked, blocked_url_prefixes=prefixes, do_not_inspect_hosts=dni)
            got = False
        except InvalidArgument:
            got = True
        assert got == want, (dni, blocked, prefixes)


@pytest.mark.parametrize("dni,blocked,prefixes,conflict", [
    (["*.bank.example"], ["evilbank.example"], [], False),
    (["*.bank.example"], ["*.evilbank.example"], [], False),
    (["evilbank.example"], ["*.bank.example"], [], False),
    (["*.bank.example"], [], ["evilbank.example/login"], False),
    (["*.bank.example"], ["www.bank.example"], [], True),
    (["www.bank.example"], ["*.bank.example"], [], True),
    (["*.bank.example"], ["bank.example"], [], True),
    (["*.bank.example"], [], ["online.bank.example/login"], True),
])
def test_a_wildcard_covers_its_domain_at_label_boundaries_only(dni: list[str], blocked: list[str],
                                                                prefixes: list[str], conflict: bool) -> None:
    """*.bank.example is bank.example and its subdomains, never evilbank.example: in the
    contradiction check (``PatternSet``) and in the pairwise rule it is checked against (``pattern_matches``)."""
    from common.policy import pattern_matches as _matches
    assert _pairwise_conflict(dni, blocked, prefixes) is conflict
    if conflict:
        with pytest.raises(InvalidArgument, match="contradicts itself"):
            _v(do_not_inspect_hosts=dni, blocked_hosts=blocked, blocked_url_prefixes=prefixes)
    else:
        p = _v(do_not_inspect_hosts=dni, blocked_hosts=blocked, blocked_url_prefixes=prefixes)
        assert p.do_not_inspect_hosts == tuple(dni) and p.blocked_hosts == tuple(blocked)
    assert _matches("*.bank.example", "www.bank.example") and not _matches("*.bank.example", "evilbank.example")


def test_validation_work_grows_linearly(monkeypatch: pytest.MonkeyPatch) -> None:
    """1,000 entries per list used to cost 0.88 s (each entry compared with every other). Counted,
    not timed (a timed ratio failed under load): the lookups the contradiction check makes grow
    10x with 10x the entries, where the pairwise rule grew 100x."""
    from common.policy import PatternSet
    from control_plane import policy

    calls = 0
    real = PatternSet.match

    def counting(self: PatternSet, host: str) -> str | None:
        nonlocal calls
        calls += 1
        return real(self, host)

    monkeypatch.setattr(PatternSet, "match", counting)

    def work(n: int) -> int:
        nonlocal calls
        calls = 0
        policy.validate(private_zen_only=False, fail_mode=policy.FailMode.OPEN, key_idle_timeout_seconds=0,
                        location_cidrs=[f"10.{i // 256}.{i % 256}.0/24" for i in range(n)],
                        blocked_hosts=[f"blocked{i}.example.com" for i in range(n)],
                        blocked_url_prefixes=[f"site{i}.example.org/private/" for i in range(n)],
                        do_not_inspect_hosts=[f"*.bank{i}.example.net" for i in range(n)])
        return calls

    small, large = work(100), work(1000)
    assert small > 0 and large <= small * 10, (small, large)


def test_the_total_size_is_bounded() -> None:
    from control_plane.errors import InvalidArgument
    from control_plane.policy import FailMode, validate
    with pytest.raises(InvalidArgument, match="bytes in all"):
        validate(private_zen_only=False, fail_mode=FailMode.OPEN, key_idle_timeout_seconds=0, location_cidrs=[],
                 blocked_hosts=[], do_not_inspect_hosts=[],
                 blocked_url_prefixes=[f"example.com/{'p' * 1000}{i}" for i in range(300)])


def test_proxy_credential_verifiers_and_name_constraints_are_checked() -> None:
    from keylib import proxyauth
    from keylib.names import NameConstraints

    v = proxyauth.make("a-proxy-credential-of-the-org", iterations=10_000)
    p = _v(proxy_credential_verifiers=[v, v], permitted_dns_subtrees=["Example.COM", ".shop.test"],
           excluded_dns_subtrees=["bank.example.com"])
    assert p.proxy_credential_verifiers == (v,)
    assert p.name_constraints == NameConstraints(("example.com", "shop.test"), ("bank.example.com",))
    assert Policy.from_json(p.to_json()) == p
    assert _v().name_constraints is None
    for kw, says in (({"proxy_credential_verifiers": ["hunter2"]}, "keyward proxy-verifier"),
                     ({"proxy_credential_verifiers": [v] * 9}, "at most 8"),
                     ({"permitted_dns_subtrees": ["*.example.com"]}, "no wildcard"),
                     ({"excluded_dns_subtrees": ["not a host"]}, "is not a host name"),
                     ({"permitted_dns_subtrees": ["a.test"], "excluded_dns_subtrees": ["a.test"]},
                      "both a permitted and an excluded")):
        with pytest.raises(InvalidArgument) as e:
            _v(**kw)
        assert says in str(e.value), (kw, str(e.value))
