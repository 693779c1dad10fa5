"""control_plane.identity: SPIFFE identities from client certificates."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography.hazmat.primitives import serialization

from control_plane.errors import InvalidArgument, Unauthenticated
from control_plane.identity import Role, check_id, from_certificate, parse_spiffe_id
from devstack.pki import build_cert

NOW = dt.datetime.now(dt.UTC)


def _pem(**kw: object) -> bytes:
    ca, ca_key = build_cert(subject_cn="ca", issuer=None, issuer_key=None, is_ca=True)
    cert, _ = build_cert(subject_cn="c", issuer=ca, issuer_key=ca_key, **kw)  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("uri,role,subject", [
    ("spiffe://keyward/platform-admin", Role.PLATFORM_ADMIN, ""),
    ("spiffe://keyward/org-admin/acme", Role.ORG_ADMIN, "acme"),
    ("spiffe://keyward/zen-pool/eu-private", Role.ZEN_POOL, "eu-private"),
])
def test_roles(uri: str, role: Role, subject: str) -> None:
    ident = from_certificate(_pem(uris=[uri]), trust_domain="keyward")
    assert (ident.role, ident.subject, str(ident)) == (role, subject, uri)


@pytest.mark.parametrize("kw,msg", [
    ({}, "exactly one URI SAN"),
    ({"uris": ["spiffe://keyward/platform-admin", "spiffe://keyward/zen-pool/a1b"]}, "exactly one URI SAN"),
    ({"uris": ["spiffe://keyward/platform-admin"], "is_ca": True}, "CA certificate"),
    ({"uris": ["spiffe://other/platform-admin"]}, "trust domain"),
    ({"uris": ["https://keyward/platform-admin"]}, "not a spiffe"),
    ({"uris": ["spiffe://keyward/org-admin/Bad_Org"]}, "no known role"),
    ({"uris": ["spiffe://keyward/zen-pool/a/b"]}, "no known role"),
    ({"uris": ["spiffe://keyward/platform-admin"], "not_before": NOW - dt.timedelta(days=9),
      "not_after": NOW - dt.timedelta(days=1)}, "expired"),
    ({"uris": ["spiffe://keyward/platform-admin"], "not_before": NOW + dt.timedelta(days=1),
      "not_after": NOW + dt.timedelta(days=9)}, "not yet valid"),
])
def test_refusals(kw: dict[str, object], msg: str) -> None:
    with pytest.raises(Unauthenticated, match=msg):
        from_certificate(_pem(**kw), trust_domain="keyward")


def test_garbage_certificate() -> None:
    with pytest.raises(Unauthenticated, match="cannot be parsed"):
        from_certificate(b"not a cert", trust_domain="keyward")


def test_spiffe_prefix_is_exact() -> None:
    with pytest.raises(Unauthenticated, match="trust domain"):
        parse_spiffe_id("spiffe://keyward.evil/platform-admin", trust_domain="keyward")


@pytest.mark.parametrize("bad", ["", "ab", "A-b", "-abc", "abc-", "a" * 64, "a_b", "a/b", "1abc"])
def test_check_id(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        check_id(bad, "org_id")
    assert check_id("acme-2", "org_id") == "acme-2"


def test_trailing_newline_is_not_an_id() -> None:
    for bad in ("acme\n", "acme\r\n"):
        with pytest.raises(InvalidArgument):
            check_id(bad, "org_id")
    with pytest.raises(Unauthenticated):
        parse_spiffe_id("spiffe://keyward/org-admin/acme\n", trust_domain="keyward")


def test_error_messages_never_echo_key_material_or_long_input() -> None:
    from control_plane.errors import show

    pem = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkg4LVWM9nuwNSk3yByxZpYRTBnVJk5oSFUvT2vBG8HoAoGCCqGSM49"
    assert "MHcC" not in show(pem) and "BEGIN" not in show(pem)
    with pytest.raises(InvalidArgument) as e:
        check_id("x" * 20000, "org_id")
    assert len(str(e.value)) < 300
