"""Absolute-URI ``http://`` requests through the ZEN (plain HTTP, nothing to decrypt).

The same checks as inside a tunnel: a blocked host or URL prefix (on the path as the origin
reads it) gets a 403 page; the request goes to the origin without the proxy's own headers;
one access-log line per request. The I/O shell around ``policy``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from urllib.parse import urlsplit

from common.logs import log_fields
from data_plane import metrics
from data_plane.http1 import Head, check_framing, copy_body, read_head
from data_plane.messages import page_response
from data_plane.policy import Action, OrgPolicy, connect_action, url_blocked

access = logging.getLogger("keyward.zen.access")
CONNECT_TIMEOUT = 10.0


def _html(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _page(status: int, text: str) -> bytes:
    resp, body = page_response(status, text)
    return resp.to_h1(chunked=False)[:-2] + b"connection: close\r\n\r\n" + body


async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, org: str, head: Head,
                  policy: OrgPolicy, addr: Callable[[str], str], failed: Callable[[str, str, int, str], None]) -> bool:
    """Forward one absolute-URI request. True to keep the client connection."""
    check_framing(head, is_request=True)
    u = urlsplit(head.start[1])
    host = (u.hostname or "").lower()
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    if connect_action(policy, host, have_key=True) is Action.BLOCK or url_blocked(policy, host, path):
        writer.write(_page(403, f"{_html(host + path)} is blocked by your organization's policy."))
        await writer.drain()
        metrics.REQUESTS.labels(org, "403").inc()
        log_fields(access, {"org": org, "method": head.start[0], "host": host, "path": path, "status": 403,
                                "bytes": 0, "blocked": True})
        return False
    try:
        o_reader, o_writer = await asyncio.wait_for(
            asyncio.open_connection(addr(host), u.port or 80), CONNECT_TIMEOUT)
    except (TimeoutError, OSError) as e:
        failed(org, f"{host}:{u.port or 80}", 502, f"cannot reach {host}: {str(e) or type(e).__name__}")
        writer.write(_page(502, f"cannot reach {_html(host)}: {_html(str(e))}"))
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
        log_fields(access, {"org": org, "method": head.start[0], "host": host, "path": path,
                                "status": int(resp.start[1]) if resp.start[1].isdigit() else 0, "bytes": n})
        return not (closed or head.wants_close() or resp.wants_close())
    finally:
        o_writer.close()
