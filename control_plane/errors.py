"""The CA's error tree.

Every failure a caller can see is one of these; :mod:`control_plane.calls`
maps each class to one gRPC status code in a single table. Messages are
written for a person to act on and never hold key material, secrets or
stack traces. Library errors are wrapped with ``raise ... from``.
"""

from __future__ import annotations

import re

_SHOW_MAX = 48
_PEMISH = re.compile(r"-----BEGIN|PRIVATE KEY|[A-Za-z0-9+/=]{40,}")


def show(value: str) -> str:
    """Quote caller input for an error message: short, single-line, and never
    anything that looks like key material (it would reach the audit log)."""
    if _PEMISH.search(value):
        return "<input that looks like key material, not shown>"
    v = value if len(value) <= _SHOW_MAX else value[:_SHOW_MAX] + "..."
    return repr(v)


class KeywardError(Exception):
    """Base of every CA error. ``str(err)`` is safe to return to the caller."""

    org_id: str = ""
    """The organization a refusal concerns when the request does not name it in its ``org_id``
    field (WatchKeys names several): the audit row's org, so that org's admin sees it."""


class InvalidArgument(KeywardError):
    """The request is malformed: fix the input and retry."""


class NotFound(KeywardError):
    """The named object does not exist (or the caller may not see it)."""


class AlreadyExists(KeywardError):
    """The object to create exists already."""


class FailedPrecondition(KeywardError):
    """The request is well formed but the system is not in a state to do it."""


class Aborted(KeywardError):
    """A concurrent change won; re-read and retry."""


class PermissionDenied(KeywardError):
    """The caller's identity may not do this."""


class Unauthenticated(KeywardError):
    """The caller presented no acceptable client certificate."""


class Unavailable(KeywardError):
    """A dependency (the database) is unreachable; retry later."""


class DeadlineExceeded(KeywardError):
    """The call ran past its deadline or the server's cap."""


class ResourceExhausted(KeywardError):
    """The caller is over one of its limits (e.g. concurrent writes); retry later."""


class ConfigError(KeywardError):
    """The CA's own configuration is wrong; it refuses to start."""


class CommitUnknown(Unavailable):
    """A write may or may not have been applied: Postgres committed it
    locally, but the synchronous standbys' confirmation was cancelled or the
    connection died during COMMIT. Not acknowledged; retry with the same
    request id."""
