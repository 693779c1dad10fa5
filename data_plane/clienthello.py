"""The TLS ClientHello, read before anything is decided (pure).

The ZEN reads the client's ClientHello first, then decides on the name the
minted leaf will carry (the SNI, else the CONNECT host), then dials and
verifies the origin under that same name: mitmproxy's order. ``parse`` takes
the bytes seen so far and says whether they hold a whole ClientHello yet;
``decide`` is the policy on the two names, as a table.
"""

from __future__ import annotations

from dataclasses import dataclass

from data_plane.policy import Action

MAX_HELLO = 16 * 1024 + 5 * 4
"""A ClientHello larger than this is refused (post-quantum key shares fit well within)."""


class NotTls(ValueError):
    """The bytes are not a TLS handshake."""


@dataclass(frozen=True)
class ClientHello:
    sni: str | None
    alpn: tuple[str, ...]


def _u(b: bytes, i: int, n: int) -> int:
    if i + n > len(b):
        raise NotTls("truncated ClientHello")
    return int.from_bytes(b[i:i + n], "big")


def parse(buf: bytes) -> ClientHello | None:
    """The ClientHello in ``buf`` (the first bytes from the client); None while incomplete."""
    hs = b""
    i = 0
    while True:
        head = buf[i:i + 2]
        if (head[:1] and head[0] != 22) or (len(head) == 2 and head[1] != 3):
            raise NotTls("the client did not start a TLS handshake")
        if len(buf) < i + 5:
            return None
        n = int.from_bytes(buf[i + 3:i + 5], "big")
        if len(buf) < i + 5 + n:
            if len(buf) > MAX_HELLO:
                raise NotTls("ClientHello too large")
            return None
        hs += buf[i + 5:i + 5 + n]
        i += 5 + n
        if len(hs) >= 4:
            if hs[0] != 1:
                raise NotTls("the first handshake message is not a ClientHello")
            want = 4 + int.from_bytes(hs[1:4], "big")
            if want > MAX_HELLO:
                raise NotTls("ClientHello too large")
            if len(hs) >= want:
                return _hello(hs[4:want])


def _hello(b: bytes) -> ClientHello:
    i = 2 + 32  # version, random
    i += 1 + _u(b, i, 1)  # session id
    i += 2 + _u(b, i, 2)  # cipher suites
    i += 1 + _u(b, i, 1)  # compression methods
    if i == len(b):
        return ClientHello(None, ())
    end = i + 2 + _u(b, i, 2)
    i += 2
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    while i + 4 <= end:
        typ, n = _u(b, i, 2), _u(b, i + 2, 2)
        body = b[i + 4:i + 4 + n]
        if len(body) != n:
            raise NotTls("truncated extension")
        if typ == 0 and n >= 5:  # server_name: list of (type, name); host_name is type 0
            j, stop = 2, 2 + _u(body, 0, 2)
            while j + 3 <= stop:
                kind, ln = body[j], _u(body, j + 1, 2)
                if kind == 0:
                    try:
                        sni = body[j + 3:j + 3 + ln].decode("ascii").lower().rstrip(".")
                    except UnicodeDecodeError:
                        raise NotTls("server name is not ASCII") from None
                    break
                j += 3 + ln
        elif typ == 16 and n >= 2:  # ALPN
            j, stop, out = 2, 2 + _u(body, 0, 2), []
            while j < stop:
                ln = body[j]
                out.append(body[j + 1:j + 1 + ln].decode("ascii", "replace"))
                j += 1 + ln
            alpn = tuple(out)
        i += 4 + n
    return ClientHello(sni, alpn)


def needed(buf: bytes) -> int:
    """How many bytes the ClientHello needs at least, from what ``buf`` says so far (its record headers):
    the shell waits until that many are there (SO_RCVLOWAT) instead of polling."""
    i = 0
    while len(buf) >= i + 5:
        i += 5 + int.from_bytes(buf[i + 3:i + 5], "big")
        if len(buf) < i:
            return i
    return i + 5


def decide(connect_host: str, sni: str | None, on_name: dict[str, Action]) -> tuple[Action, str, str]:
    """What to do once the ClientHello is read: (verdict, name, reason).

    ``on_name`` gives the org policy's verdict for each of the names involved (the CONNECT host and,
    if any, the SNI). The leaf and the origin's verification both use ``name`` (the SNI, else the
    CONNECT host). When the SNI differs from the CONNECT host:

    * a block of either name blocks (a forged SNI does not lift the CONNECT host's block, nor the
      reverse);
    * it is never tunnelled uninspected: a do-not-inspect SNI must not carry a client, unseen, to an
      arbitrary CONNECT host (domain fronting); it is blocked;
    * otherwise it is intercepted under the SNI, and the origin (the CONNECT host's address) must
      prove that name.
    """
    name = sni or connect_host
    if sni is None or sni == connect_host:
        v = on_name[name]
        return v, name, f"policy for {name}"
    a, b = on_name[connect_host], on_name[sni]
    if Action.BLOCK in (a, b):
        return Action.BLOCK, name, f"{connect_host if a is Action.BLOCK else sni} is blocked"
    if Action.TUNNEL in (a, b):
        return Action.BLOCK, name, (f"the TLS server name {sni} differs from the CONNECT host {connect_host}: "
                                     "not tunnelled uninspected")
    if Action.REFUSE in (a, b):
        return Action.REFUSE, name, "no key: the org's fail mode"
    return Action.INTERCEPT, name, f"intercepted as {sni}, the TLS server name"
