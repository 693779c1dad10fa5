"""Plumbing shared by the test servers (tests/origins.py, tests/tunnel.py):

* ``LoopServer``: a TCP listener on 127.0.0.1, port 0, served by an asyncio
  loop in a daemon thread of its own, so a synchronous test can start it,
  read ``.port`` and ``.stop()`` it (or use it as a context manager).
* ``TlsStream``: server-side TLS driven by hand over ``ssl.MemoryBIO``.
  asyncio's own TLS (``start_server(ssl=...)``) drops the bytes OpenSSL
  queued when a handshake fails, so a client would see a bare reset instead
  of the alert; here the alert is flushed to the socket before closing.
* ``strict_alpn``: ALPN where no overlap is a fatal handshake alert.
  CPython's ``set_alpn_protocols`` answers "no overlap" with NOACK (the
  handshake succeeds with no protocol selected, checked with OpenSSL 3.0), so
  a client offering only http/1.1 to an h2-only server would get a TLS
  session it cannot use. RFC 7301 section 3.2 says the server should send
  ``no_application_protocol`` instead, as nginx and Go do; Python has no hook
  for that, so the OpenSSL callback is installed through ctypes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ssl
import threading
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

T = TypeVar("T")

# Connection-level failures a test client causes routinely (h2load, curl
# closing early, a reset): not bugs of the server, so not recorded in errors.
CLIENT_GONE = (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, EOFError, TimeoutError)


class LoopServer:
    """Base: an asyncio TCP server on 127.0.0.1:0 in a background thread.

    Subclasses implement ``handle(reader, writer)``; each connection is a
    task, cancelled by ``stop()``. ``errors`` collects unexpected exceptions
    from handlers (a test may assert it stays empty)."""

    def __init__(self, name: str) -> None:
        self.errors: list[str] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()
        self._stopped = False
        self._server = self.call(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port: int = self._server.sockets[0].getsockname()[1]

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        """Run ``coro`` on the server's loop from another thread, bounded."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A task tracked for ``stop()`` (call from the loop thread)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handle(reader, writer)
        except asyncio.CancelledError:
            pass
        except CLIENT_GONE:
            pass
        except Exception as e:  # a bug in a test server: keep it visible to the test
            self.errors.append(f"{type(e).__name__}: {e}")
        finally:
            self._tasks.discard(task)
            writer.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True

        async def shutdown() -> None:
            self._server.close()
            # Cancel again while any task lives: a task can outlive one cancel
            # (a connection accepted meanwhile, or one that swallowed it).
            for _ in range(50):
                if not self._tasks:
                    break
                for t in list(self._tasks):
                    t.cancel()
                await asyncio.wait(list(self._tasks), timeout=0.1)
            await asyncio.sleep(0)  # let closed transports run their close callbacks

        try:
            self.call(shutdown(), timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class TlsStream:
    """Server-side TLS over an accepted TCP connection, by hand (see module doc).

    After ``handshake()``, plaintext arrives in ``reader`` (a StreamReader, so
    ``readuntil``/``readexactly`` work) and ``write()`` encrypts and sends."""

    def __init__(self, ctx: ssl.SSLContext, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self._raw_r, self._raw_w = reader, writer
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self._in, self._out, server_side=True)
        self.reader = asyncio.StreamReader(limit=1 << 16)
        self._pump: asyncio.Task[None] | None = None

    def _flush(self) -> None:
        data = self._out.read()
        if data and not self._raw_w.is_closing():
            self._raw_w.write(data)

    async def handshake(self, timeout: float = 10) -> None:
        """Complete the handshake; on failure send OpenSSL's alert, then raise."""
        async def run() -> None:
            while True:
                try:
                    self.obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self._flush()
                    data = await self._raw_r.read(1 << 16)
                    if data:
                        self._in.write(data)
                    else:
                        self._in.write_eof()
                except ssl.SSLError:
                    self._flush()  # the alert (e.g. no_application_protocol) reaches the client
                    await self._raw_w.drain()
                    raise
            self._flush()
        # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel
        # arriving as the handshake completes, and stop() would wait forever.
        async with asyncio.timeout(timeout):
            await run()
        self._pump = asyncio.get_running_loop().create_task(self._pump_in())

    async def _pump_in(self) -> None:
        failed = False
        try:
            while True:
                # Decrypt what is buffered first: the client's first request
                # often arrives with its Finished, during the handshake.
                while True:
                    try:
                        chunk = self.obj.read(1 << 16)
                    except ssl.SSLWantReadError:
                        break
                    if not chunk:
                        raise EOFError
                    self.reader.feed_data(chunk)
                self._flush()  # reading can produce records too (key updates)
                data = await self._raw_r.read(1 << 16)
                if data:
                    self._in.write(data)
                else:
                    self._in.write_eof()
        except (EOFError, ssl.SSLZeroReturnError, ssl.SSLEOFError, ConnectionError):
            pass
        except ssl.SSLError as e:
            failed = True
            self.reader.set_exception(e)
        finally:
            self._flush()
            if not failed:
                self.reader.feed_eof()  # also when cancelled: no reader is left waiting

    @property
    def alpn(self) -> str | None:
        return self.obj.selected_alpn_protocol()

    def write(self, data: bytes) -> None:
        if self._raw_w.is_closing():
            raise ConnectionResetError("connection closed")
        self.obj.write(data)
        self._flush()

    async def drain(self) -> None:
        await self._raw_w.drain()

    def close(self, notify: bool = True) -> None:
        """Close; ``notify=False`` skips close_notify, so the client sees the
        connection end without a TLS-level close (an unexpected EOF)."""
        if self._pump is not None:
            self._pump.cancel()
        if notify and not self._raw_w.is_closing():
            with contextlib.suppress(ssl.SSLError):  # WantRead: our close_notify is queued; not waiting for theirs
                self.obj.unwrap()
            self._flush()
        self._raw_w.close()


_SSL_TLSEXT_ERR_OK = 0
_SSL_TLSEXT_ERR_ALERT_FATAL = 2  # OpenSSL then sends alert no_application_protocol (120)
_ALPN_SELECT_CB = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_ubyte),
    ctypes.c_void_p, ctypes.c_uint, ctypes.c_void_p)


def _libssl() -> ctypes.CDLL:
    # The very libssl the ssl module is linked to (dlopen hands back the loaded copy).
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "/libssl.so" in line:
                return ctypes.CDLL(line.split()[-1])
    raise RuntimeError("libssl is not loaded")


def strict_alpn(ctx: ssl.SSLContext, protocols: Sequence[str]) -> None:
    """Select the first of ``protocols`` (server preference) the client
    offers; if none is offered, fail the handshake with the fatal alert
    no_application_protocol. A client sending no ALPN extension at all is
    not affected (OpenSSL does not call the callback): no protocol is
    selected and the handshake succeeds."""
    lib = _libssl()
    # PySSLContext starts with PyObject_HEAD, then the SSL_CTX pointer.
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    if not ptr or lib.SSL_CTX_get_options(ptr) != ctx.options:
        raise RuntimeError("cannot reach the SSL_CTX behind ssl.SSLContext on this Python")
    wanted = [p.encode() for p in protocols]

    def select(_ssl: int | None, out: Any, outlen: Any, offered_p: int | None, n: int,
               _arg: int | None) -> int:
        try:
            assert offered_p is not None
            offered = ctypes.string_at(offered_p, n)
            at: dict[bytes, int] = {}
            i = 0
            while i < len(offered):
                ln = offered[i]
                at.setdefault(offered[i + 1:i + 1 + ln], i + 1)
                i += 1 + ln
            for p in wanted:
                if p in at:
                    out[0] = offered_p + at[p]  # must point into OpenSSL's buffer, not ours
                    outlen[0] = len(p)
                    return _SSL_TLSEXT_ERR_OK
        except Exception:
            pass
        return _SSL_TLSEXT_ERR_ALERT_FATAL

    cb = _ALPN_SELECT_CB(select)
    ctx._strict_alpn_cb = cb  # OpenSSL holds only a raw pointer: keep it alive
    lib.SSL_CTX_set_alpn_select_cb.argtypes = [ctypes.c_void_p, _ALPN_SELECT_CB, ctypes.c_void_p]
    lib.SSL_CTX_set_alpn_select_cb(ptr, cb, None)
