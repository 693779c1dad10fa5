"""Process hardening of every keyward process that holds a secret (the CA, the ZEN and its
signers, the operator): one definition, called first thing at start.

No core dumps (``RLIMIT_CORE`` 0) and not dumpable (``PR_SET_DUMPABLE`` 0): the process's
memory cannot be read from a core file, nor by ptrace from a process of the same user that
lacks ``CAP_SYS_PTRACE`` (``/proc/PID/mem`` included). The kernel makes a process dumpable
again when it executes a program, so a child process (the ZEN's signers) hardens itself too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def no_core_dumps() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def dumpable() -> bool:
    """Whether this process may be dumped or ptraced by its user (for tests and diagnostics)."""
    return bool(_libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
