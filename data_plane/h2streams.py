"""The ends of an HTTP/2 stream for h2conn: resets as exceptions, error codes by name."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import h2.exceptions
from h2.errors import ErrorCodes


class StreamReset(Exception):
    """The stream ended by RST_STREAM (or with its connection) before its message was complete."""

    def __init__(self, code: int, why: str = "", side: str = "") -> None:
        super().__init__(why or f"stream reset ({code_name(code)})")
        self.code = code
        self.side = side
        """Whose stream ended: "client" or "origin" (the endpoint's side)."""


def code_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)


@contextlib.contextmanager
def closed_as_reset(side: str) -> Iterator[None]:
    """Writing to a stream the peer has reset (h2 says StreamClosedError) is that stream's end."""
    try:
        yield
    except h2.exceptions.StreamClosedError as e:
        raise StreamReset(int(getattr(e, "error_code", 0) or ErrorCodes.CANCEL), side=side) from None
