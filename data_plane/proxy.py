"""The ZEN's forward proxy: the I/O shell around policy.py, keys.py, mint.py.

Per client connection: read a request head; ``CONNECT host:port`` is decided
by the org's policy (intercept, tunnel, block, refuse); absolute-URI requests
are forwarded as plain HTTP with the same checks; ``GET /proxy.pac`` serves a
PAC file. Interception verifies the origin against the system trust store plus
configured roots (an untrusted origin gets a 502 page, never a silent trust),
completes the client's handshake with a minted leaf, and inspects every
HTTP/1.1 request inside the tunnel (logged; blocked URL prefixes get 403).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import ssl

from data_plane import metrics
from data_plane.http1 import Head, HttpError, copy_body, read_head, splice
from data_plane.keys import KeyManager, OrgKey
from data_plane.mint import Minter
from data_plane.policy import Action, connect_action, org_for, url_blocked

log = logging.getLogger("keyward.zen")
access = logging.getLogger("keyward.zen.access")

CONNECT_TIMEOUT = 10.0
_ID = re.compile(r"[a-z][a-z0-9-]{1,61}[a-z0-9]")


def page(status: int, reason: str, text: str, extra: str = "") -> bytes:
    body = (f"<!doctype html><title>{status} {reason}</title><h1>{reason}</h1><p>{text}</p>"
            "<p>keyward ZEN</p>\n").encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/html; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n").encode() + body


def _html(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class Proxy:
    def __init__(self, km: KeyManager, minter: Minter, origin_ctx: ssl.SSLContext, *,
                 origin_h1_ctx: ssl.SSLContext | None = None,
                 resolve: dict[str, str] | None = None, pac_proxies: list[str] | None = None) -> None:
        self.km = km
        self.minter = minter
        self.origin_ctx = origin_ctx
        self.origin_h1_ctx = origin_h1_ctx or origin_ctx
        self.resolve = resolve or {}
        self.pac_proxies = pac_proxies or []

    def _addr(self, host: str) -> str:
        return self.resolve.get(host.lower(), host)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        try:
            await self._serve(reader, writer, str(peer[0]))
        except (HttpError, ValueError) as e:
            with contextlib.suppress(Exception):
                writer.write(page(400, "Bad Request", _html(str(e))))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError, ssl.SSLError):
            pass
        except Exception:
            log.exception("connection failed")
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def _proxy_user(self, head: Head) -> str | None:
        auth = head.get("proxy-authorization") or ""
        if auth.lower().startswith("basic "):
            try:
                return base64.b64decode(auth[6:]).decode().split(":", 1)[0]
            except (ValueError, UnicodeDecodeError):
                return None
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ip: str) -> None:
        while True:
            head = await read_head(reader)
            if head is None:
                return
            method, target = head.start[0], head.start[1]
            if method == "GET" and target == "/proxy.pac":
                body = self.pac().encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ns-proxy-autoconfig\r\n"
                             + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                await writer.drain()
                continue
            user = self._proxy_user(head)
            org = org_for(self.km.policies, ip, user)
            if org is None and user and _ID.fullmatch(user):
                # An org this ZEN has not heard of: ask the CA (which refuses, and audits,
                # unless this pool serves the org); its key brings its policy.
                await self.km.signer_for(user)
                org = org_for(self.km.policies, ip, user)
            if org is None:
                writer.write(page(407, "Proxy Authentication Required",
                                  "This network belongs to no organization; authenticate as your organization.",
                                  'Proxy-Authenticate: Basic realm="keyward"\r\n'))
                await writer.drain()
                return
            metrics.CONNECTIONS.labels(org).inc()
            if method == "CONNECT":
                await self._connect(reader, writer, org, target)
                return
            if not target.startswith("http://"):
                writer.write(page(400, "Bad Request", "A proxy request needs CONNECT or an absolute http:// URI."))
                await writer.drain()
                return
            if not await self._plain(reader, writer, org, head):
                return

    def pac(self) -> str:
        proxies = "; ".join(f"PROXY {p}" for p in self.pac_proxies) or "DIRECT"
        return f'function FindProxyForURL(url, host) {{ return "{proxies}; DIRECT"; }}\n'

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, org: str,
                       target: str) -> None:
        host, _, port_s = target.rpartition(":")
        host = host.strip("[]").lower()
        if not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
            raise HttpError("CONNECT target must be host:port, with a port from 1 to 65535")
        port = int(port_s)
        policy = self.km.policies[org]
        action = connect_action(policy, host, have_key=True)
        key = None
        if action is Action.INTERCEPT:
            key = await self.km.signer_for(org)
            action = connect_action(policy, host, have_key=key is not None)
        metrics.DECISIONS.labels(org, {Action.INTERCEPT: "intercepted", Action.TUNNEL: "tunnelled",
                                       Action.BLOCK: "blocked", Action.REFUSE: "refused"}[action]).inc()
        access.info(json.dumps({"org": org, "connect": f"{host}:{port}", "action": action.value}))
        if action is Action.BLOCK:
            writer.write(page(403, "Forbidden", f"{_html(host)} is blocked by your organization's policy."))
            await writer.drain()
            return
        if action is Action.REFUSE:
            writer.write(page(503, "Service Unavailable",
                              "Your organization's traffic cannot be inspected right now and its policy is "
                              "fail-closed."))
            await writer.drain()
            return
        if action is Action.TUNNEL:
            try:
                o_reader, o_writer = await asyncio.wait_for(
                    asyncio.open_connection(self._addr(host), port), CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as e:
                writer.write(page(502, "Bad Gateway", f"cannot reach {_html(host)}: {_html(str(e))}"))
                await writer.drain()
                return
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await self._splice(reader, writer, o_reader, o_writer)
            return
        assert key is not None
        try:
            o_reader, o_writer = await asyncio.wait_for(asyncio.open_connection(
                self._addr(host), port, ssl=self.origin_ctx, server_hostname=host), CONNECT_TIMEOUT)
        except ssl.SSLCertVerificationError as e:
            writer.write(page(502, "Bad Gateway",
                              f"The certificate of {_html(host)} is not trusted ({_html(e.verify_message or str(e))}); "
                              "the connection was refused."))
            await writer.drain()
            return
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as e:
            writer.write(page(502, "Bad Gateway", f"cannot reach {_html(host)}: {_html(str(e))}"))
            await writer.drain()
            return
        try:
            await self._intercept(reader, writer, o_reader, o_writer, org, host, port, key)
        finally:
            # Whatever happens from here on (a client that never completes its handshake, sends
            # no TLS at all, or hangs up), the origin connection goes with the client's.
            with contextlib.suppress(Exception):
                o_writer.close()

    async def _intercept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         o_reader: asyncio.StreamReader, o_writer: asyncio.StreamWriter, org: str, host: str,
                         port: int, key: OrgKey) -> None:
        sslobj = o_writer.get_extra_info("ssl_object")
        peer = sslobj.getpeercert() if sslobj else None
        sans = [v for k, v in (peer or {}).get("subjectAltName", ()) if k in ("DNS", "IP Address")]
        origin_proto = (sslobj.selected_alpn_protocol() if sslobj else None) or "http/1.1"
        # Offer the client what the origin accepted (h2 also lets an h1-only client fall back).
        alpn = ("h2", "http/1.1") if origin_proto == "h2" else ("http/1.1",)
        ctx = await asyncio.to_thread(self.minter.context_for, org, key.key_id, key.signer, key.certificate_pem,
                                      host, sans, alpn)
        minter = self.minter

        def on_sni(sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            # The leaf names the client's SNI when it sends one, else the CONNECT host.
            if name and name.lower() != host:
                sslobj.context = minter.context_for(org, key.key_id, key.signer, key.certificate_pem,
                                                    name.lower(), sans, alpn)

        ctx.sni_callback = on_sni
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await writer.start_tls(ctx)
        c_ssl = writer.get_extra_info("ssl_object")
        client_proto = (c_ssl.selected_alpn_protocol() if c_ssl else None) or "http/1.1"
        try:
            if client_proto == "h2" and origin_proto == "h2":
                # HTTP/2 on both sides: relayed (decrypted and re-encrypted), logged per connection.
                access.info(json.dumps({"org": org, "host": host, "protocol": "h2", "relayed": True}))
                await self._splice(reader, writer, o_reader, o_writer)
                return
            if origin_proto == "h2":
                # The client speaks HTTP/1.1 only: talk HTTP/1.1 to the origin as well.
                o_writer.close()
                o_reader, o_writer = await asyncio.wait_for(asyncio.open_connection(
                    self._addr(host), port, ssl=self.origin_h1_ctx, server_hostname=host), CONNECT_TIMEOUT)
            await self._inspect(reader, writer, o_reader, o_writer, org, host)
        finally:
            with contextlib.suppress(Exception):
                o_writer.close()  # the HTTP/1.1 one, when it replaced the first

    async def _inspect(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter,
                       o_reader: asyncio.StreamReader, o_writer: asyncio.StreamWriter, org: str, host: str) -> None:
        while True:
            req = await read_head(c_reader)
            if req is None:
                return
            method, path = req.start[0], req.start[1]
            policy = self.km.policies.get(org)
            if policy is not None and url_blocked(policy, host, path):
                c_writer.write(page(403, "Forbidden", f"{_html(host + path)} is blocked by your organization's policy."))
                await c_writer.drain()
                metrics.REQUESTS.labels(org, "403").inc()
                access.info(json.dumps({"org": org, "method": method, "host": host, "path": path, "status": 403,
                                        "bytes": 0, "blocked": True}))
                return
            o_writer.write(req.raw)
            await copy_body(req, c_reader, o_writer, is_response=False)
            resp = await read_head(o_reader)
            if resp is None:
                return
            c_writer.write(resp.raw)
            n, closed = await copy_body(resp, o_reader, c_writer, is_response=True, request_method=method)
            metrics.REQUESTS.labels(org, resp.start[1]).inc()
            access.info(json.dumps({"org": org, "method": method, "host": host, "path": path,
                                    "status": int(resp.start[1]) if resp.start[1].isdigit() else 0, "bytes": n}))
            if closed or req.wants_close() or resp.wants_close():
                return

    async def _plain(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, org: str, head: Head) -> bool:
        """Forward one absolute-URI request. True to keep the client connection."""
        from urllib.parse import urlsplit

        u = urlsplit(head.start[1])
        host = (u.hostname or "").lower()
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        policy = self.km.policies[org]
        if connect_action(policy, host, have_key=True) is Action.BLOCK or url_blocked(policy, host, path):
            writer.write(page(403, "Forbidden", f"{_html(host + path)} is blocked by your organization's policy."))
            await writer.drain()
            metrics.REQUESTS.labels(org, "403").inc()
            access.info(json.dumps({"org": org, "method": head.start[0], "host": host, "path": path, "status": 403,
                                    "bytes": 0, "blocked": True}))
            return False
        try:
            o_reader, o_writer = await asyncio.wait_for(
                asyncio.open_connection(self._addr(host), u.port or 80), CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as e:
            writer.write(page(502, "Bad Gateway", f"cannot reach {_html(host)}: {_html(str(e))}"))
            await writer.drain()
            return False
        try:
            headers = [(k, v) for k, v in head.headers if k.lower() not in ("proxy-authorization", "proxy-connection")]
            raw = f"{head.start[0]} {path} {head.start[2]}\r\n".encode("latin-1") + b"".join(
                f"{k}: {v}\r\n".encode("latin-1") for k, v in headers) + b"\r\n"
            o_writer.write(raw)
            await copy_body(head, reader, o_writer, is_response=False)
            resp = await read_head(o_reader)
            if resp is None:
                return False
            writer.write(resp.raw)
            n, closed = await copy_body(resp, o_reader, writer, is_response=True, request_method=head.start[0])
            metrics.REQUESTS.labels(org, resp.start[1]).inc()
            access.info(json.dumps({"org": org, "method": head.start[0], "host": host, "path": path,
                                    "status": int(resp.start[1]) if resp.start[1].isdigit() else 0, "bytes": n}))
            return not (closed or head.wants_close() or resp.wants_close())
        finally:
            o_writer.close()

    async def _splice(self, a_r: asyncio.StreamReader, a_w: asyncio.StreamWriter, b_r: asyncio.StreamReader,
                      b_w: asyncio.StreamWriter) -> None:
        await splice(a_r, a_w, b_r, b_w)
        b_w.close()


def origin_context(extra_roots_file: str, alpn: tuple[str, ...] = ("h2", "http/1.1")) -> ssl.SSLContext:
    """Verifies origins against the system store plus the extra roots."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if extra_roots_file:
        ctx.load_verify_locations(cafile=extra_roots_file)
    ctx.set_alpn_protocols(list(alpn))
    return ctx

