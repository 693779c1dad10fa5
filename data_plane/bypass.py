"""The bypass relay: a plain forwarding proxy that decrypts nothing.

Used only when both planes fail (the operator points a pool's Service here):
``CONNECT`` is tunnelled byte for byte, absolute-URI HTTP is forwarded. It
holds no key, no certificate and no policy. ``python -m data_plane.bypass``
(KEYWARD_BYPASS_LISTEN, default 0.0.0.0:8080).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from urllib.parse import urlsplit

from common.logs import setup
from data_plane.http1 import HttpError, copy_body, read_head, splice

log = logging.getLogger("keyward.bypass")


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await read_head(reader)
        if head is None:
            return
        method, target = head.start[0], head.start[1]
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            o_r, o_w = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), 10)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            log.info(json.dumps({"bypass": "tunnel", "to": target}))
            await splice(reader, writer, o_r, o_w)
            o_w.close()
            return
        u = urlsplit(target)
        if u.scheme != "http" or not u.hostname:
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        o_r, o_w = await asyncio.wait_for(asyncio.open_connection(u.hostname, u.port or 80), 10)
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        o_w.write(f"{method} {path} {head.start[2]}\r\n".encode("latin-1") + b"".join(
            f"{k}: {v}\r\n".encode("latin-1") for k, v in head.headers
            if k.lower() not in ("proxy-authorization", "proxy-connection")) + b"\r\n")
        await copy_body(head, reader, o_w, is_response=False)
        resp = await read_head(o_r)
        if resp is not None:
            writer.write(resp.raw)
            await copy_body(resp, o_r, writer, is_response=True, request_method=method)
        o_w.close()
    except (TimeoutError, HttpError, OSError, ValueError, asyncio.IncompleteReadError) as e:
        log.info(json.dumps({"bypass": "failed", "status": 502, "reason": str(e) or type(e).__name__}))
        with contextlib.suppress(Exception):
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    finally:
        with contextlib.suppress(Exception):
            await writer.drain()
            writer.close()


async def run(listen: str) -> None:
    host, _, port = listen.rpartition(":")
    server = await asyncio.start_server(handle, host or "0.0.0.0", int(port))
    log.info("bypass listening", extra={"port": server.sockets[0].getsockname()[1]})
    async with server:
        await server.serve_forever()


def main() -> int:
    setup("INFO", "keyward-bypass")
    asyncio.run(run(os.environ.get("KEYWARD_BYPASS_LISTEN", "0.0.0.0:8080")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
