"""data_plane.clienthello: the ClientHello read first, and the decision on the name the leaf carries."""

from __future__ import annotations

import ssl

import pytest

from data_plane.clienthello import NotTls, decide, needed, parse
from data_plane.policy import Action


def _hello(sni: str | None, alpn: list[str]) -> bytes:
    ctx = ssl.create_default_context()
    if alpn:
        ctx.set_alpn_protocols(alpn)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=sni) if sni else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).wrap_bio(inc, out)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def test_parses_what_a_real_client_sends() -> None:
    raw = _hello("Shop.Example", ["h2", "http/1.1"])
    h = parse(raw)
    assert h is not None and h.sni == "shop.example" and h.alpn == ("h2", "http/1.1")
    # Incomplete: not yet, and how many bytes it needs.
    for cut in (1, 4, 5, len(raw) // 2, len(raw) - 1):
        assert parse(raw[:cut]) is None
        assert needed(raw[:cut]) > cut
    assert needed(raw) == len(raw) + 5 or parse(raw) is not None
    no_sni = parse(_hello(None, []))
    assert no_sni is not None and no_sni.sni is None and no_sni.alpn == ()


@pytest.mark.parametrize("raw", [b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", b"\x15\x03\x03"])
def test_not_tls_is_refused(raw: bytes) -> None:
    with pytest.raises(NotTls):
        parse(raw)


I, T, B, R = Action.INTERCEPT, Action.TUNNEL, Action.BLOCK, Action.REFUSE


@pytest.mark.parametrize("host,sni,verdicts,want", [
    ("shop.example", None, {"shop.example": I}, (I, "shop.example")),
    ("shop.example", "shop.example", {"shop.example": T}, (T, "shop.example")),
    # The leaf names the SNI, and the origin must prove it.
    ("1.2.3.4", "shop.example", {"1.2.3.4": I, "shop.example": I}, (I, "shop.example")),
    # A forged SNI lifts no block, either way round.
    ("blocked.example", "shop.example", {"blocked.example": B, "shop.example": I}, (B, "shop.example")),
    ("shop.example", "blocked.example", {"shop.example": I, "blocked.example": B}, (B, "blocked.example")),
    # Domain fronting through a do-not-inspect name: never tunnelled unseen to another host.
    ("evil.example", "bank.example", {"evil.example": I, "bank.example": T}, (B, "bank.example")),
    ("bank.example", "evil.example", {"bank.example": T, "evil.example": I}, (B, "evil.example")),
    ("x.example", "y.example", {"x.example": R, "y.example": R}, (R, "y.example")),
])
def test_decision_table(host: str, sni: str | None, verdicts: dict[str, Action], want: tuple[Action, str]) -> None:
    got = decide(host, sni, verdicts)
    assert got[:2] == want, got
