"""Reading settings from the environment: one reading of each kind of value for every process.

Each parser takes the variable's name and its raw text and returns the value, or raises
:class:`SettingError` with one line naming both, ``NAME=value: why`` (the value as given; a
setting never holds a secret: secrets come from ``*_FILE`` paths). :func:`get` is the one rule
for an absent setting: unset or blank means the default.

The CA (``control_plane.config``), the ZEN (``data_plane.config``) and the operator
(``k8s.operator.config``) read their settings with these, so ``KEYWARD_REQUIRE_MLOCK=off`` means
the same to each of them, and a bad value reads the same in each one's log.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Mapping
from typing import TypeVar

T = TypeVar("T")

LOOPBACK = "127.0.0.1"
"""Where a listen address with no host (``:9464``) binds: nothing is exposed by omission."""

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


class SettingError(ValueError):
    """A setting is malformed; the message names it (``NAME=value: why``)."""


def get(env: Mapping[str, str], name: str, default: T, parse: Callable[[str, str], T]) -> T:
    """``parse(name, value)`` of the variable, or ``default`` when it is unset or blank."""
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    return parse(name, raw)


def text(name: str, raw: str) -> str:
    return raw


def boolean(name: str, raw: str) -> bool:
    v = raw.strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise SettingError(f"{name}={raw}: not a boolean (true or false)")


def integer(name: str, raw: str, lo: int, hi: int) -> int:
    try:
        v = int(raw.strip())
    except ValueError:
        raise SettingError(f"{name}={raw}: not an integer") from None
    if not lo <= v <= hi:
        raise SettingError(f"{name}={v}: out of range {lo}..{hi}")
    return v


def number(name: str, raw: str, lo: float, hi: float, unit: str = "") -> float:
    """A decimal number within lo..hi, in ``unit`` (named in the error)."""
    what = f" ({unit})" if unit else ""
    try:
        v = float(raw.strip())
    except ValueError:
        raise SettingError(f"{name}={raw}: not a number{what}") from None
    if not lo <= v <= hi:  # NaN fails here too
        raise SettingError(f"{name}={raw}: out of range {lo:g}..{hi:g}{what}")
    return v


def seconds(name: str, raw: str, lo: float, hi: float) -> float:
    """A duration in seconds (a decimal number)."""
    return number(name, raw, lo, hi, "seconds")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(name: str, raw: str) -> str:
    v = raw.strip().upper()
    if v not in LOG_LEVELS:
        raise SettingError(f"{name}={raw}: not one of {', '.join(LOG_LEVELS)}")
    return v


EVENT_LOOPS = ("uvloop", "asyncio")
"""What a program's event loop may be (``common.loops.run``): libuv's, or asyncio's own."""


def event_loop(name: str, raw: str) -> str:
    v = raw.strip().lower()
    if v not in EVENT_LOOPS:
        raise SettingError(f"{name}={raw}: uvloop or asyncio")
    return v


def integer_in(lo: int, hi: int) -> Callable[[str, str], int]:
    """A parser of integers within lo..hi, for :func:`get`."""
    return lambda name, raw: integer(name, raw, lo, hi)


def number_in(lo: float, hi: float, unit: str = "") -> Callable[[str, str], float]:
    """A parser of numbers within lo..hi (in ``unit``), for :func:`get`."""
    return lambda name, raw: number(name, raw, lo, hi, unit)


def seconds_in(lo: float, hi: float) -> Callable[[str, str], float]:
    """A parser of durations within lo..hi seconds, for :func:`get`."""
    return number_in(lo, hi, "seconds")


def hostport(name: str, raw: str, *, port_zero: bool = True) -> str:
    """``host:port`` to listen on (port 0: any free port) or, with ``port_zero=False``, to
    connect to. An IPv6 host goes in brackets; an empty host means :data:`LOOPBACK`."""
    host, sep, port = raw.strip().rpartition(":")
    if not sep or not port.isdigit() or not (0 if port_zero else 1) <= int(port) <= 65535:
        raise SettingError(f"{name}={raw}: not host:port (a port from {0 if port_zero else 1} to 65535)")
    if host.startswith("[") != host.endswith("]"):
        raise SettingError(f"{name}={raw}: an IPv6 host goes in brackets, [::1]:8080")
    return raw.strip()


def address(name: str, raw: str) -> str:
    """``host:port`` to connect to (port 1..65535)."""
    return hostport(name, raw, port_zero=False)


def split_hostport(listen: str) -> tuple[str, int]:
    """(host, port) of a checked ``host:port``: brackets removed, no host meaning :data:`LOOPBACK`."""
    host, _, port = listen.strip().rpartition(":")
    return host.strip("[]") or LOOPBACK, int(port)


_WHY = {errno.ENOENT: "no such file", errno.EACCES: "permission denied", errno.EISDIR: "is a directory",
        errno.EADDRINUSE: "address already in use", errno.EADDRNOTAVAIL: "address not available on this host"}


def why(e: OSError) -> str:
    """An OS error in a few words, for ``NAME=value: why``."""
    return _WHY.get(e.errno or 0) or (e.strerror or type(e).__name__).lower()


def read_file(name: str, path: str) -> bytes:
    """The content of the file a setting names (its content is never quoted in an error)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise SettingError(f"{name}={path}: {why(e)}") from None
