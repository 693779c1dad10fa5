"""``ConnectTunnel``: a local port that reaches a target through a CONNECT
proxy, for clients that cannot use an HTTP proxy themselves (nghttp,
h2load): point them at ``https://127.0.0.1:<tunnel.port>/...``."""

from __future__ import annotations

import asyncio
import base64

from tests.aioserver import CLIENT_GONE, LoopServer


async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close ``w``; on an error close ``w`` outright
    so the other direction ends too."""
    try:
        while data := await r.read(1 << 16):
            w.write(data)
            await w.drain()
        if w.can_write_eof():
            w.write_eof()  # TLS close_notify and h2 GOAWAY travel before this FIN
    except (*CLIENT_GONE, OSError):  # OSError: write_eof after the peer reset (ENOTCONN)
        w.close()


class ConnectTunnel(LoopServer):
    """Listens on 127.0.0.1 (port 0); per accepted connection: TCP to the
    proxy at 127.0.0.1:``proxy_port``, ``CONNECT target_host:target_port
    HTTP/1.1`` with ``Host`` and ``Proxy-Authorization: Basic``, wait for a
    2xx, then relay bytes both ways until both sides end.

    ``ConnectTunnel(proxy_port, target_host, target_port, proxy_user,
    proxy_pass, timeout=10.0)``; attributes ``port``, ``established``
    (tunnels the proxy accepted), ``refused`` (the proxy's status line for
    each one it did not; the client's connection is then closed), ``errors``.
    ``timeout`` bounds the connect and the wait for the proxy's answer; a
    relay lasts as long as its two sides. ``stop()``, or a context manager.
    """

    def __init__(self, proxy_port: int, target_host: str, target_port: int,
                 proxy_user: str, proxy_pass: str, timeout: float = 10.0) -> None:
        self.proxy_port, self.timeout = proxy_port, timeout
        host = f"[{target_host}]" if ":" in target_host else target_host
        self.authority = f"{host}:{target_port}"
        cred = base64.b64encode(f"{proxy_user}:{proxy_pass}".encode()).decode()
        self._request = (f"CONNECT {self.authority} HTTP/1.1\r\nHost: {self.authority}\r\n"
                         f"Proxy-Authorization: Basic {cred}\r\n\r\n").encode()
        self.established = 0
        self.refused: list[str] = []
        super().__init__("connect-tunnel")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with asyncio.timeout(self.timeout):  # not wait_for: see TlsStream.handshake
            pr, pw = await asyncio.open_connection("127.0.0.1", self.proxy_port)
        try:
            pw.write(self._request)
            # Bytes after the header block (none from a conforming proxy before
            # the client speaks) stay in pr's buffer and are relayed below.
            async with asyncio.timeout(self.timeout):
                head = await pr.readuntil(b"\r\n\r\n")
            status = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = status.split(" ", 2)
            if len(parts) < 2 or not parts[1].startswith("2"):
                self.refused.append(status)
                return
            self.established += 1
            await asyncio.gather(pipe(reader, pw), pipe(pr, writer))
        finally:
            pw.close()
