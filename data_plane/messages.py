"""HTTP requests and responses as plain data, and their HTTP/1.1 and HTTP/2 forms (pure).

Whatever the two sides of an intercepted connection speak, the inspection sees one
``Request`` and one ``Response`` per exchange: method, authority, path and the end-to-end
headers, with names in lower case and without the connection-specific headers that one
protocol has and the other forbids (RFC 9113 section 8.2.2, RFC 9110 section 7.6.1). Each
side renders them in its own protocol: HTTP/2 header lists with pseudo-headers, or an
HTTP/1.1 head with Host and the body framing chosen by the caller.

No sockets here: headers in, a message or a ``MessageError`` out.
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus

from data_plane.http1 import Head
from data_plane.policy import split_target

Header = tuple[bytes, bytes]

# Connection-specific: meaningful for one hop only, forbidden in HTTP/2 (``te`` is kept when it
# is exactly "trailers", which gRPC needs). Proxy credentials never go further than the ZEN.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
                        b"te", b"proxy-authorization", b"proxy-authenticate", b"http2-settings", b"host"})
NO_BODY_STATUSES = frozenset({204, 304})


class MessageError(Exception):
    """A request or response that cannot be carried: the stream (or HTTP/1.1 connection) fails."""


def _end_to_end(headers: list[Header] | tuple[Header, ...]) -> tuple[Header, ...]:
    named = {t.strip().lower() for k, v in headers if k == b"connection" for t in v.split(b",")}
    out = []
    for k, v in headers:
        if k == b"te" and v.strip().lower() == b"trailers":
            out.append((k, b"trailers"))
        elif k not in HOP_BY_HOP and k not in named and not k.startswith(b":"):
            out.append((k, v))
    return tuple(out)


def _get(headers: tuple[Header, ...], name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None


@dataclass(frozen=True)
class Request:
    method: str
    authority: str
    """host[:port], from :authority or Host."""
    path: str
    headers: tuple[Header, ...]
    """End-to-end headers, lower-case names, no pseudo-headers."""
    scheme: str = "https"

    @property
    def host(self) -> str:
        a = self.authority
        if a.startswith("["):
            return a[1:a.find("]")].lower()
        return a.rpartition(":")[0].lower() if ":" in a else a.lower()

    @property
    def content_length(self) -> int | None:
        v = _get(self.headers, b"content-length")
        return int(v) if v is not None and v.isdigit() else None

    def to_h2(self) -> list[Header]:
        return [(b":method", self.method.encode()), (b":scheme", self.scheme.encode()),
                (b":authority", self.authority.encode()), (b":path", self.path.encode()), *self.headers]

    def to_h1(self, *, chunked: bool) -> bytes:
        """The HTTP/1.1 head. ``chunked``: the body's length is not known in advance."""
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {self.authority}"]
        cookies = [v for k, v in self.headers if k == b"cookie"]
        for k, v in self.headers:
            if k == b"cookie" or (chunked and k == b"content-length"):
                continue  # HTTP/2 may split cookies; HTTP/1.1 wants one header (RFC 9113 8.2.3)
            lines.append(f"{k.decode('latin-1')}: {v.decode('latin-1')}")
        if cookies:
            lines.append("cookie: " + b"; ".join(cookies).decode("latin-1"))
        if chunked:
            lines.append("transfer-encoding: chunked")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass(frozen=True)
class Response:
    status: int
    headers: tuple[Header, ...]

    @property
    def content_length(self) -> int | None:
        v = _get(self.headers, b"content-length")
        return int(v) if v is not None and v.isdigit() else None

    def has_body(self, request_method: str) -> bool:
        return not (request_method == "HEAD" or self.status in NO_BODY_STATUSES or self.status < 200)

    def to_h2(self) -> list[Header]:
        return [(b":status", str(self.status).encode()), *self.headers]

    def to_h1(self, *, chunked: bool) -> bytes:
        try:
            reason = HTTPStatus(self.status).phrase
        except ValueError:
            reason = "Status"
        lines = [f"HTTP/1.1 {self.status} {reason}"]
        lines += [f"{k.decode('latin-1')}: {v.decode('latin-1')}" for k, v in self.headers
                  if not (chunked and k == b"content-length")]
        if chunked:
            lines.append("transfer-encoding: chunked")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def request_from_h2(headers: list[Header]) -> Request:
    pseudo = {k: v for k, v in headers if k.startswith(b":")}
    method = pseudo.get(b":method", b"").decode("latin-1")
    authority = (pseudo.get(b":authority") or _get(tuple(headers), b"host") or b"").decode("latin-1")
    path = pseudo.get(b":path", b"").decode("latin-1")
    if method == "CONNECT":
        raise MessageError("CONNECT inside an intercepted connection is not supported")
    if not method or not path or not authority:
        raise MessageError("a request needs :method, :path and :authority (or host)")
    return Request(method, authority, path, _end_to_end(headers),
                   pseudo.get(b":scheme", b"https").decode("latin-1"))


def request_from_h1(head: Head, default_authority: str) -> Request:
    """An HTTP/1.1 request; an absolute-form target's authority wins over Host (RFC 9112 3.2.2)."""
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in head.headers]
    target_authority, path = split_target(head.start[1])
    authority = target_authority or head.get("host") or default_authority
    return Request(head.start[0], authority, path, _end_to_end(headers))


def request_line(head: Head, default_authority: str) -> Request:
    """:func:`request_from_h1` without the headers (empty): what is decided and logged of a
    request relayed as it is (HTTP/1.1 on both sides: its bytes go as they came)."""
    target_authority, path = split_target(head.start[1])
    return Request(head.start[0], target_authority or head.get("host") or default_authority, path, ())


def response_from_h2(headers: list[Header]) -> Response:
    status = dict(headers).get(b":status", b"")
    if not status.isdigit():
        raise MessageError("a response without a valid :status")
    return Response(int(status), _end_to_end(headers))


def response_from_h1(head: Head) -> Response:
    if not head.start[1].isdigit():
        raise MessageError("a response without a valid status code")
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in head.headers]
    return Response(int(head.start[1]), _end_to_end(headers))


def page_response(status: int, text: str) -> tuple[Response, bytes]:
    """An error or refusal page as a message, for any protocol (the HTTP/1.1 ``proxy.page``'s body)."""
    reason = HTTPStatus(status).phrase
    body = (f"<!doctype html><title>{status} {reason}</title><h1>{reason}</h1><p>{text}</p>"
            "<p>keyward ZEN</p>\n").encode()
    return Response(status, ((b"content-type", b"text/html; charset=utf-8"),
                             (b"content-length", str(len(body)).encode()))), body
