"""The client's ClientHello, read from its socket without being consumed (the I/O of clienthello.py).

The proxy decides on the name in the ClientHello before the TLS layer takes the connection,
which must then read the same bytes: they are peeked at (MSG_PEEK) through a duplicate
descriptor of the socket (the transport owns the original in the loop), waiting with
SO_RCVLOWAT for as many bytes as the record headers announce, not polling. SO_RCVLOWAT is the
socket's, so it is set only when more bytes are needed than have come (most ClientHellos come
whole, in one segment) and always set back to 1 before the transport reads again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

from data_plane.clienthello import MAX_HELLO, ClientHello, NotTls, needed, parse


async def peek_client_hello(writer: asyncio.StreamWriter, timeout: float) -> ClientHello:
    """Peek at the client's ClientHello (MSG_PEEK: it stays for the TLS layer), waiting with
    SO_RCVLOWAT for as many bytes as its record headers announce (no polling)."""
    loop = asyncio.get_running_loop()
    sock = writer.get_extra_info("socket")
    # A duplicate descriptor of the same socket: the transport owns the original in the loop.
    dup = socket.socket(fileno=os.dup(sock.fileno()))
    dup.setblocking(False)
    lowat = 1  # the default: set only when what arrived says more is needed (most hellos come whole)
    try:
        async with asyncio.timeout(timeout):
            want = 1
            while True:
                if min(want, MAX_HELLO) != lowat:
                    lowat = min(want, MAX_HELLO)
                    dup.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
                ready: asyncio.Future[None] = loop.create_future()

                def wake(f: asyncio.Future[None] = ready) -> None:
                    if not f.done():
                        f.set_result(None)
                loop.add_reader(dup.fileno(), wake)
                try:
                    await ready
                finally:
                    loop.remove_reader(dup.fileno())
                buf = dup.recv(MAX_HELLO, socket.MSG_PEEK)
                if not buf:
                    raise NotTls("the client closed the connection")
                hello = parse(buf)
                if hello is not None:
                    return hello
                want = needed(buf)
    finally:
        if lowat != 1:
            with contextlib.suppress(OSError):
                dup.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        dup.close()
