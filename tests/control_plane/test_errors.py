"""control_plane.errors.show: caller input quoted in messages (which become audit details)
never carries key material, with or without a PEM header."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from control_plane.errors import InvalidArgument, show
from control_plane.identity import check_id
from control_plane.policy import FailMode, validate

NOT_SHOWN = "<input that looks like key material, not shown>"


def _der(kind: str) -> bytes:
    key = (ec.generate_private_key(ec.SECP256R1()) if kind == "ec"
           else rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _leaks(b64: str, text: str) -> list[str]:
    """Every 40-character run of the key's base64 that ``text`` holds."""
    return [b64[i:i + 40] for i in range(len(b64) - 39) if b64[i:i + 40] in text]


@pytest.fixture(scope="module", params=["ec", "rsa"])
def key_b64(request: pytest.FixtureRequest) -> str:
    return base64.b64encode(_der(request.param)).decode()


def test_a_bare_base64_private_key_is_not_shown(key_b64: str) -> None:
    """No "-----BEGIN", no "PRIVATE KEY": the base64 run alone must be recognized, as one line,
    as the lines of a PEM body without its armour, or within other text."""
    body = "\n".join(key_b64[i:i + 64] for i in range(0, len(key_b64), 64))
    for value in (key_b64, body, f"host {key_b64} here", key_b64[100:160]):
        assert show(value) == NOT_SHOWN, value[:20]
        assert not _leaks(key_b64, show(value))


def test_ordinary_input_is_still_quoted() -> None:
    assert show("acme") == "'acme'"
    assert show("Bad_ID") == "'Bad_ID'"
    long = "news.example.com/" * 6  # long, but no base64-like run of 40
    assert show(long) == repr(long[:48] + "...")


def test_errors_quoting_a_bare_key_hold_none_of_it(key_b64: str) -> None:
    """What the audit detail of a refused call would hold (its message) for a bare key given as
    an org id or a blocked host."""
    with pytest.raises(InvalidArgument) as e:
        check_id(key_b64, "org_id")
    assert NOT_SHOWN in str(e.value) and not _leaks(key_b64, str(e.value))
    with pytest.raises(InvalidArgument, match="is not a host name") as e:
        validate(private_zen_only=False, fail_mode=FailMode.OPEN, key_idle_timeout_seconds=0, location_cidrs=[],
                 blocked_hosts=[key_b64], blocked_url_prefixes=[], do_not_inspect_hosts=[])
    assert NOT_SHOWN in str(e.value) and not _leaks(key_b64, str(e.value))
