"""Locked, non-dumpable, zero-on-release memory for key material.

A :class:`LockedBuffer` is an anonymous private mapping that is

* locked in RAM with ``mlock(2)`` so it is never written to swap,
* excluded from core dumps with ``madvise(MADV_DONTDUMP)``,
* zeroed before it is unlocked and unmapped (:meth:`LockedBuffer.wipe`,
  also on context exit and garbage collection).

Python ``bytes`` objects cannot be wiped through the language; for the few
that a library hands back to us (cryptography's ``private_bytes``) we zero
their storage in place with :func:`wipe_bytes` (CPython only) as soon as the
value has been sealed. That is best effort, and documented as such.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
from types import TracebackType

from keylib.errors import SecureMemoryError

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)

_PAGE = mmap.PAGESIZE


class LockedBuffer:
    """A fixed-size buffer of key material in locked, non-dumpable memory.

    ``view`` is a writable memoryview of exactly ``size`` bytes; pass it to
    ``*_into`` APIs (``AESGCM.decrypt_into``, ``HKDF.derive_into``). Do not
    keep slices of it past :meth:`wipe`.
    """

    def __init__(self, size: int, *, require_lock: bool = True) -> None:
        if size <= 0:
            raise SecureMemoryError("a locked buffer needs a positive size")
        self.size = size
        self._maplen = (size + _PAGE - 1) // _PAGE * _PAGE
        self._map: mmap.mmap | None = mmap.mmap(
            -1, self._maplen, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        )
        self._cbuf = (ctypes.c_char * self._maplen).from_buffer(self._map)
        self._addr = ctypes.addressof(self._cbuf)
        self.locked = _libc.mlock(self._addr, self._maplen) == 0
        if not self.locked and require_lock:
            err = ctypes.get_errno()
            self._release()
            raise SecureMemoryError(
                f"mlock failed (errno {err}): raise RLIMIT_MEMLOCK or grant "
                "CAP_IPC_LOCK; key material must not be swappable"
            )
        if hasattr(mmap, "MADV_DONTDUMP"):
            self._map.madvise(mmap.MADV_DONTDUMP)
        self._view: memoryview | None = memoryview(self._map)[:size]

    @property
    def view(self) -> memoryview:
        if self._view is None:
            raise SecureMemoryError("buffer already wiped")
        return self._view

    @property
    def wiped(self) -> bool:
        return self._map is None

    def wipe(self) -> None:
        """Zero the whole mapping, then unlock and unmap it. Idempotent."""
        if self._map is None:
            return
        ctypes.memset(self._addr, 0, self._maplen)
        self._release()

    def _release(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
        if getattr(self, "locked", False):
            _libc.munlock(self._addr, self._maplen)
            self.locked = False
        # The ctypes export pins the mapping; drop it before closing.
        del self._cbuf
        assert self._map is not None
        self._map.close()
        self._map = None

    def __enter__(self) -> LockedBuffer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wipe()

    def __del__(self) -> None:
        try:  # noqa: SIM105 (not contextlib.suppress: at interpreter shutdown the module may be gone)
            self.wipe()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def __repr__(self) -> str:  # never shows content
        state = "wiped" if self.wiped else f"{self.size} bytes"
        return f"<LockedBuffer {state}>"


_BYTES_HEADER = sys.getsizeof(b"") - 1  # offset of ob_sval in PyBytesObject


def wipe_bytes(data: bytes) -> None:
    """Zero the storage of a ``bytes`` object in place (CPython only).

    Only for plaintext that a library returned as ``bytes`` and that we own
    outright (no other reference may rely on its value). Objects of length
    0 or 1 are shared singletons and are left alone; they hold no secret.
    """
    if sys.implementation.name != "cpython" or len(data) <= 1:
        return
    ctypes.memset(id(data) + _BYTES_HEADER, 0, len(data))


def from_bytes(data: bytes | bytearray | memoryview, *, require_lock: bool = True) -> LockedBuffer:
    """Copy ``data`` into a new locked buffer."""
    buf = LockedBuffer(len(data), require_lock=require_lock)
    buf.view[:] = data
    return buf
