"""keylib.proxyauth: the one definition of a proxy credential verifier."""

from __future__ import annotations

import pytest

from keylib import proxyauth


def test_a_verifier_checks_its_secret_and_nothing_else() -> None:
    v = proxyauth.make("correct horse battery staple", iterations=proxyauth.MIN_ITERATIONS)
    parsed = proxyauth.parse(v)
    assert v.startswith("pbkdf2-sha256$10000$") and "correct" not in v
    assert proxyauth.check("correct horse battery staple", parsed)
    assert not proxyauth.check("correct horse battery stapl", parsed)
    assert not proxyauth.check("", parsed)
    # Two verifiers of one secret differ (salted).
    assert proxyauth.make("correct horse battery staple", iterations=10_000) != v


@pytest.mark.parametrize("text, says", [
    ("plaintext-password", "pbkdf2-sha256$<iterations>$<salt>$<hash>"),
    ("pbkdf2-sha256$many$AAAA$AAAA", "must be a number"),
    ("pbkdf2-sha256$1000$" + "A" * 24 + "$" + "A" * 44, "10000..2000000 iterations, not 1000"),
    ("pbkdf2-sha256$99999999$" + "A" * 24 + "$" + "A" * 44, "not 99999999"),
    ("pbkdf2-sha256$10000$QUFB$" + "A" * 44, "salt of 16..64 bytes"),
    ("pbkdf2-sha256$10000$" + "A" * 24 + "$!!", "base64"),
])
def test_malformed_verifiers_are_refused_with_what_to_fix(text: str, says: str) -> None:
    with pytest.raises(proxyauth.VerifierError, match=None) as e:
        proxyauth.parse(text)
    assert says in str(e.value)


def test_short_secrets_are_refused() -> None:
    with pytest.raises(proxyauth.VerifierError, match="at least 16 bytes"):
        proxyauth.make("short")
