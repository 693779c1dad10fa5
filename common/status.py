"""What a failed call to the CA means to its clients: one classification of gRPC status codes,
for the ZEN (``data_plane.ca_client``), the operator (``k8s.operator.ca_client``) and the admin
command line (``control_plane.adminctl``: its exit codes).

* :attr:`Outcome.RETRY`: nothing was decided; the same call may succeed later, unchanged (the CA
  or its database is away, the call ran out of time, the caller is over a rate or concurrency
  limit, a concurrent change won). Keep what you hold and try again.
* :attr:`Outcome.REFUSED`: the CA answered and the answer is no; it will say no again until
  someone changes something (an identity, a binding, the input, the org's keys). Act on it:
  a ZEN drops the org's key, the operator reports it on the pool, the CLI says why.
* :attr:`Outcome.BROKEN`: the CA failed (INTERNAL with a reference id, UNKNOWN, DATA_LOSS, or a
  code this table does not know). Neither a decision nor a transient state: a ZEN keeps what it
  holds (a CA bug must not take keys away), the operator and the CLI report it for a person.

The classifier takes the code's name (``grpc.StatusCode.X.name``, the canonical names of the
gRPC specification): :mod:`common` imports no grpc, so that the operator's pure planners, the
CLI's output and anything else can use it, and the same names are what the CA's metrics and
audit rows record (``keyward_ca_rpcs_total{code=...}``, an audit row's outcome).
"""

from __future__ import annotations

from enum import Enum


class Outcome(Enum):
    RETRY = "retry"
    REFUSED = "refused"
    BROKEN = "broken"


RETRY = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED"})
"""CANCELLED: the CA stopping cancels its calls in flight (or the client gave up)."""

REFUSED = frozenset({"PERMISSION_DENIED", "UNAUTHENTICATED", "NOT_FOUND", "FAILED_PRECONDITION",
                     "INVALID_ARGUMENT", "ALREADY_EXISTS", "OUT_OF_RANGE", "UNIMPLEMENTED"})
"""UNIMPLEMENTED: the server does not have the method (an older CA, or not a CA at all)."""


def classify(code: str) -> Outcome:
    """The outcome of a failed call whose status code is named ``code`` (e.g. ``"UNAVAILABLE"``)."""
    if code == "OK":
        raise ValueError("OK is not a failure")
    if code in RETRY:
        return Outcome.RETRY
    if code in REFUSED:
        return Outcome.REFUSED
    return Outcome.BROKEN  # INTERNAL, UNKNOWN, DATA_LOSS, and any code not listed above
