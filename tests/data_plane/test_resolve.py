"""KEYWARD_ZEN_RESOLVE: fixed addresses for origin names, exact or ``*.domain`` (the policy's
pattern rule: the domain itself and every name below it)."""

from __future__ import annotations

import ssl
from typing import Any

import pytest

from data_plane.config import ZenConfigError, from_env
from data_plane.proxy import Proxy

REQUIRED = {"KEYWARD_ZEN_TLS_CERT_FILE": "c", "KEYWARD_ZEN_TLS_KEY_FILE": "k", "KEYWARD_ZEN_CA_TRUST_FILE": "t",
            "KEYWARD_MASTER_SECRET_FILE": "m"}


def _proxy(resolve: str) -> Proxy:
    table = dict(from_env({**REQUIRED, "KEYWARD_ZEN_RESOLVE": resolve}).resolve)
    none: Any = None  # _addr needs neither keys nor a minter
    return Proxy(none, none, ssl.create_default_context(), resolve=table)


@pytest.mark.parametrize("host,addr", [
    ("bench.test", "127.0.0.2"),           # the domain itself
    ("a.bench.test", "127.0.0.2"),
    ("x.y.bench.test", "127.0.0.2"),       # any depth
    ("A.Bench.Test.", "127.0.0.2"),        # case and a trailing dot
    ("exact.bench.test", "127.0.0.3"),     # an exact entry wins over the wildcard
    ("z.deep.bench.test", "127.0.0.4"),    # the nearest domain's wildcard wins
    ("deep.bench.test", "127.0.0.4"),
    ("good.test", "127.0.0.1"),            # exact entries as before
    ("www.good.test", "www.good.test"),    # not listed: DNS (the name itself)
    ("evilbench.test", "evilbench.test"),  # a label boundary, not a string suffix
    ("bench.test.evil", "bench.test.evil"),
])
def test_a_wildcard_entry_resolves_its_domain_and_every_name_below(host: str, addr: str) -> None:
    p = _proxy("good.test=127.0.0.1, *.bench.test=127.0.0.2,exact.bench.test=127.0.0.3,*.DEEP.bench.test.=127.0.0.4")
    assert p._addr(host) == addr


@pytest.mark.parametrize("entry", ["*bench.test=127.0.0.1", "a.*.test=127.0.0.1", "*.=127.0.0.1", "*=127.0.0.1",
                                   "*.*.test=127.0.0.1"])
def test_a_wildcard_anywhere_but_a_first_label_is_refused(entry: str) -> None:
    with pytest.raises(ZenConfigError, match="KEYWARD_ZEN_RESOLVE: entry .*: a wildcard is a first label"):
        from_env({**REQUIRED, "KEYWARD_ZEN_RESOLVE": entry})
