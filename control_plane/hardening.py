"""Process hardening shared by keyward's long-running programs.

No core dumps (RLIMIT_CORE 0) and not dumpable (PR_SET_DUMPABLE 0): the
process's memory cannot be read by a core file or by ptrace from a process of
the same user that lacks CAP_SYS_PTRACE.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

PR_SET_DUMPABLE = 4


def no_core_dumps() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
