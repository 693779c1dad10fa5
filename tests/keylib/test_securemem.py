"""keylib.securemem: locked, non-dumpable, zeroed buffers."""

from __future__ import annotations

import ctypes

import pytest

from keylib.errors import SecureMemoryError
from keylib.securemem import LockedBuffer, from_bytes, wipe_bytes


def _vmflags(addr: int) -> list[str]:
    """VmFlags of the mapping that starts at ``addr`` (from /proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if "-" in line.split(" ")[0] and int(line.split("-")[0], 16) == addr:
            for follow in lines[i + 1:]:
                if follow.startswith("VmFlags:"):
                    return follow.split()[1:]
    raise AssertionError("mapping not found")


def test_buffer_is_locked_and_excluded_from_core_dumps() -> None:
    with LockedBuffer(100) as buf:
        assert buf.locked
        flags = _vmflags(buf._addr)
        assert "lo" in flags  # mlock'd: never swapped
        assert "dd" in flags  # MADV_DONTDUMP: not in core dumps
        assert len(buf.view) == 100


def test_wipe_zeroes_before_unmapping(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = from_bytes(b"\xaa" * 64)
    seen: list[bytes] = []
    original = LockedBuffer._release

    def spy(self: LockedBuffer) -> None:
        seen.append(ctypes.string_at(self._addr, self._maplen))
        original(self)

    monkeypatch.setattr(LockedBuffer, "_release", spy)
    buf.wipe()
    assert seen and seen[0] == bytes(len(seen[0]))
    assert buf.wiped and repr(buf) == "<LockedBuffer wiped>"
    with pytest.raises(SecureMemoryError):
        _ = buf.view
    buf.wipe()  # idempotent


def test_repr_never_shows_content() -> None:
    with from_bytes(b"top secret key material") as buf:
        assert "secret" not in repr(buf)


def test_wipe_bytes_zeroes_in_place() -> None:
    data = bytes(bytearray(b"plaintext-der-" * 4))  # a fresh object, not a shared constant
    view = id(data)
    wipe_bytes(data)
    assert id(data) == view and data == bytes(len(data))


def test_zero_size_refused() -> None:
    with pytest.raises(SecureMemoryError):
        LockedBuffer(0)
