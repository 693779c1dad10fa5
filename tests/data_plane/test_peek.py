"""data_plane.peek: the ClientHello read without being consumed, whole or in pieces, and the
socket left as the transport needs it (SO_RCVLOWAT back to 1, every byte still there)."""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest

from data_plane.clienthello import NotTls
from data_plane.peek import peek_client_hello


def _hello(sni: str) -> bytes:
    """The first flight of a real TLS client (Python's), offering h2 and http/1.1."""
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    out = ssl.MemoryBIO()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


@pytest.mark.parametrize("pieces", [1, 3, 40], ids=["whole", "in-3", "in-40"])
def test_the_hello_is_read_and_stays_for_the_tls_layer(pieces: int) -> None:
    hello = _hello("a.test")

    async def main() -> None:
        got: asyncio.Future[tuple[object, bytes, int]] = asyncio.get_running_loop().create_future()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.transport.pause_reading()  # type: ignore[attr-defined]  # as the proxy does
            h = await peek_client_hello(writer, 5)
            lowat = writer.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)
            writer.transport.resume_reading()  # type: ignore[attr-defined]
            got.set_result((h, await reader.readexactly(len(hello)), lowat))
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        _, w = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        step = -(-len(hello) // pieces)
        for i in range(0, len(hello), step):
            w.write(hello[i:i + step])
            await w.drain()
            await asyncio.sleep(0.02)
        h, rest, lowat = await asyncio.wait_for(got, 10)
        assert (h.sni, h.alpn) == ("a.test", ("h2", "http/1.1"))  # type: ignore[attr-defined]
        assert rest == hello and lowat == 1
        w.close()
        server.close()
    asyncio.run(main())


def test_not_tls_is_said_at_once() -> None:
    async def main() -> None:
        res: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.transport.pause_reading()  # type: ignore[attr-defined]
            try:
                await peek_client_hello(writer, 5)
                res.set_result(None)
            except NotTls as e:
                res.set_result(e)
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        _, w = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        w.write(b"GET / HTTP/1.1\r\n\r\n")
        assert isinstance(await asyncio.wait_for(res, 10), NotTls)
        w.close()
        server.close()
    asyncio.run(main())
