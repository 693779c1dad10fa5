"""data_plane.messages: one Request/Response whatever the protocol, without hop-by-hop headers."""

from __future__ import annotations

import pytest

from data_plane.http1 import Head
from data_plane.messages import (
    MessageError,
    Request,
    Response,
    page_response,
    request_from_h1,
    request_from_h2,
    response_from_h1,
    response_from_h2,
)


def _h2(*extra: tuple[bytes, bytes], authority: bytes = b"shop.test") -> list[tuple[bytes, bytes]]:
    return [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", authority), (b":path", b"/a?b=1"),
            *extra]


def _head(start: str, *headers: tuple[str, str]) -> Head:
    return Head(start.split(" ", 2), list(headers), b"")


def test_hop_by_hop_and_connection_named_headers_are_dropped() -> None:
    req = request_from_h2(_h2(
        (b"connection", b"keep-alive, X-Private , x-other"), (b"keep-alive", b"timeout=5"),
        (b"proxy-connection", b"keep-alive"), (b"transfer-encoding", b"chunked"), (b"upgrade", b"h2c"),
        (b"http2-settings", b"AAA"), (b"host", b"shop.test"), (b"proxy-authenticate", b"Basic"),
        (b"x-private", b"secret"), (b"x-other", b"1"), (b"accept", b"*/*"), (b"x-kept", b"yes")))
    assert req.headers == ((b"accept", b"*/*"), (b"x-kept", b"yes"))
    assert (req.method, req.authority, req.path, req.scheme) == ("GET", "shop.test", "/a?b=1", "https")
    resp = response_from_h2([(b":status", b"200"), (b"connection", b"x-hop"), (b"x-hop", b"1"),
                             (b"keep-alive", b"timeout=5"), (b"content-type", b"text/plain")])
    assert resp.headers == ((b"content-type", b"text/plain"),)


@pytest.mark.parametrize("value,kept", [
    (b"trailers", True), (b"Trailers ", True), (b"gzip", False), (b"trailers, deflate", False), (b"", False)])
def test_te_is_kept_only_as_trailers(value: bytes, kept: bool) -> None:
    req = request_from_h2(_h2((b"te", value)))
    assert req.headers == (((b"te", b"trailers"),) if kept else ())
    # From HTTP/1.1, where TE must be named in Connection, "trailers" still goes on (gRPC needs it).
    h1 = request_from_h1(_head("POST /svc HTTP/1.1", ("Host", "g.test"), ("TE", value.decode()),
                               ("Connection", "TE")), "x")
    assert h1.headers == (((b"te", b"trailers"),) if kept else ())


def test_proxy_authorization_is_never_forwarded() -> None:
    creds = ("Proxy-Authorization", "Basic YWNtZTpzZWNyZXQ=")
    assert request_from_h2(_h2((b"proxy-authorization", creds[1].encode()))).headers == ()
    req = request_from_h1(_head("GET / HTTP/1.1", ("Host", "shop.test"), creds), "shop.test")
    assert req.headers == ()
    assert b"YWNtZTpzZWNyZXQ" not in req.to_h1(chunked=False)
    assert all(b"YWNtZTpzZWNyZXQ" not in v for _, v in req.to_h2())


@pytest.mark.parametrize("headers,why", [
    ([(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.test")], "no :path"),
    ([(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/")], "no :authority nor host"),
    ([(b":scheme", b"https"), (b":authority", b"a.test"), (b":path", b"/")], "no :method"),
    ([(b":method", b"CONNECT"), (b":authority", b"a.test:443")], "CONNECT"),
    ([(b":method", b"CONNECT"), (b":authority", b"a.test:443"), (b":path", b"/"), (b":scheme", b"https")],
     "CONNECT, even with a path"),
])
def test_requests_that_cannot_be_carried_are_message_errors(headers: list[tuple[bytes, bytes]], why: str) -> None:
    with pytest.raises(MessageError):
        request_from_h2(headers)


def test_host_header_stands_in_for_a_missing_authority() -> None:
    req = request_from_h2([(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b"host", b"h.test")])
    assert req.authority == "h.test"
    assert req.headers == ()  # Host itself is carried as the authority, never twice


@pytest.mark.parametrize("authority,host", [
    ("shop.test:8443", "shop.test"), ("Shop.TEST", "shop.test"), ("shop.test", "shop.test"),
    ("[::1]:443", "::1"), ("[2001:DB8::1]", "2001:db8::1"), ("10.0.0.1:80", "10.0.0.1")])
def test_request_host_strips_the_port_and_brackets(authority: str, host: str) -> None:
    assert Request("GET", authority, "/", ()).host == host


def test_to_h1_chunked_drops_content_length_and_joins_cookies() -> None:
    req = Request("POST", "shop.test:8443", "/cart", (
        (b"cookie", b"a=1"), (b"content-length", b"5"), (b"x-a", b"b"), (b"cookie", b"b=2"), (b"cookie", b"c=3")))
    assert req.content_length == 5
    head = req.to_h1(chunked=True)
    assert head.endswith(b"\r\n\r\n")
    lines = head.decode().split("\r\n")[:-2]
    assert lines[0] == "POST /cart HTTP/1.1"
    assert lines[1] == "Host: shop.test:8443"
    assert "x-a: b" in lines
    assert [ln for ln in lines if ln.lower().startswith("content-length")] == []
    assert [ln for ln in lines if ln.lower().startswith("transfer-encoding")] == ["transfer-encoding: chunked"]
    assert [ln for ln in lines if ln.startswith("cookie")] == ["cookie: a=1; b=2; c=3"]
    plain = req.to_h1(chunked=False).decode()
    assert "content-length: 5\r\n" in plain and "transfer-encoding" not in plain
    assert req.to_h2()[:4] == [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"shop.test:8443"),
                               (b":path", b"/cart")]


@pytest.mark.parametrize("status,line", [
    (200, "HTTP/1.1 200 OK"), (404, "HTTP/1.1 404 Not Found"), (421, "HTTP/1.1 421 Misdirected Request"),
    (103, "HTTP/1.1 103 Early Hints"), (299, "HTTP/1.1 299 Status")])
def test_response_to_h1_reason_phrases(status: int, line: str) -> None:
    raw = Response(status, ((b"content-length", b"3"),)).to_h1(chunked=False)
    assert raw == f"{line}\r\ncontent-length: 3\r\n\r\n".encode()
    chunked = Response(status, ((b"content-length", b"3"), (b"x", b"y"))).to_h1(chunked=True)
    assert chunked == f"{line}\r\nx: y\r\ntransfer-encoding: chunked\r\n\r\n".encode()


@pytest.mark.parametrize("status,method,body", [
    (200, "GET", True), (200, "HEAD", False), (204, "GET", False), (304, "GET", False), (100, "POST", False),
    (103, "GET", False), (404, "POST", True), (205, "GET", True)])
def test_has_body(status: int, method: str, body: bool) -> None:
    assert Response(status, ()).has_body(method) is body


@pytest.mark.parametrize("status", [403, 421, 502, 503])
def test_page_response_content_length_matches_its_body(status: int) -> None:
    resp, body = page_response(status, "a <b>page</b> ü")
    assert resp.status == status
    assert resp.content_length == len(body)
    assert dict(resp.headers)[b"content-type"].startswith(b"text/html")
    assert resp.has_body("GET")


def test_request_from_h1_uses_host_else_the_default_authority() -> None:
    req = request_from_h1(_head("GET /x HTTP/1.1", ("HOST", "other.test:8443"), ("Accept", "*/*")), "shop.test")
    assert (req.method, req.authority, req.path, req.host) == ("GET", "other.test:8443", "/x", "other.test")
    assert req.headers == ((b"accept", b"*/*"),)  # lower-case names; Host carried as the authority
    bare = request_from_h1(_head("GET / HTTP/1.0", ("Accept", "*/*")), "shop.test")
    assert bare.authority == "shop.test"
    empty = request_from_h1(_head("GET / HTTP/1.1", ("Host", "")), "shop.test")
    assert empty.authority == "shop.test"


def test_responses_need_a_status() -> None:
    with pytest.raises(MessageError):
        response_from_h2([(b"content-type", b"text/plain")])
    with pytest.raises(MessageError):
        response_from_h1(_head("HTTP/1.1 abc Weird"))
    r = response_from_h1(_head("HTTP/1.1 200 OK", ("Content-Length", "12"), ("Transfer-Encoding", "chunked")))
    assert (r.status, r.headers, r.content_length) == (200, ((b"content-length", b"12"),), 12)
