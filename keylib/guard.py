"""Make the opening side of keylib unreachable in a process (the CA)."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType

from keylib.errors import KeylibError

FORBIDDEN = "keylib.unwrap"


class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == FORBIDDEN:
            raise ImportError(
                f"{FORBIDDEN} is not available in this process: the Central "
                "Authority never decrypts keys"
            )
        return None


def forbid_unwrap() -> None:
    """Refuse any later import of keylib.unwrap; fail if it is already loaded."""
    if FORBIDDEN in sys.modules:
        raise KeylibError(f"{FORBIDDEN} was imported into a process that must never decrypt")
    if not any(isinstance(f, _Refuse) for f in sys.meta_path):
        sys.meta_path.insert(0, _Refuse())
