"""The master secret: the root from which every key's password is derived.

It is read once at start from a file (in Kubernetes, a Secret on a
memory-backed volume) or, failing that, an environment variable, copied into
locked memory, and never written, logged or sent. The environment variable is
removed from ``os.environ`` after reading; its original C string cannot be
wiped, which is why a file is the recommended source.
"""

from __future__ import annotations

import os

from keylib.errors import MasterSecretError
from keylib.securemem import LockedBuffer, from_bytes, wipe_bytes

#: Minimum master secret length in bytes (256 bits of input key material).
MIN_LENGTH = 32


class MasterSecret:
    """The master secret in locked memory. ``repr`` and ``str`` hide it."""

    def __init__(self, buf: LockedBuffer) -> None:
        if buf.size < MIN_LENGTH:
            buf.wipe()
            raise MasterSecretError(
                f"master secret is shorter than {MIN_LENGTH} bytes; "
                "generate one with: head -c 48 /dev/urandom | base64"
            )
        self._buf = buf

    @property
    def view(self) -> memoryview:
        return self._buf.view

    def wipe(self) -> None:
        self._buf.wipe()

    def __repr__(self) -> str:
        return "<MasterSecret hidden>"

    __str__ = __repr__

    @classmethod
    def from_bytes(cls, data: bytes | bytearray, *, require_lock: bool = True) -> MasterSecret:
        return cls(from_bytes(data, require_lock=require_lock))

    @classmethod
    def load(
        cls,
        *,
        path: str | None,
        env_var: str = "KEYWARD_MASTER_SECRET",
        require_lock: bool = True,
    ) -> MasterSecret:
        """Read from ``path`` if given, else from ``env_var``.

        One trailing newline is stripped (files made with ``echo``).
        """
        if path:
            try:
                with open(path, "rb", buffering=0) as f:
                    raw = f.read()
            except OSError as e:
                raise MasterSecretError(
                    f"cannot read master secret file {path!r}: {e.strerror}"
                ) from None
        else:
            value = os.environ.pop(env_var, None)
            if not value:
                raise MasterSecretError(
                    f"no master secret: set {env_var}_FILE to a file holding "
                    f"at least {MIN_LENGTH} random bytes (or {env_var} itself)"
                )
            raw = value.encode()
        if raw.endswith(b"\r\n"):
            n = len(raw) - 2
        elif raw.endswith(b"\n"):
            n = len(raw) - 1
        else:
            n = len(raw)
        view = memoryview(raw)[:n]
        try:
            return cls(from_bytes(view, require_lock=require_lock))
        finally:
            view.release()
            wipe_bytes(raw)
