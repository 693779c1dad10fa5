"""The CA's logging: the JSON lines every keyward process writes (:mod:`common.logs`).

Log calls pass ids, never objects that could hold key material; the
formatter writes only the message, level, logger and explicit ``extra``
fields from :data:`SAFE_FIELDS`, and of an exception only its type and frames.
gRPC's own lines are JSON too, and a client refused at the TLS handshake (no
certificate, an untrusted one) is one line naming the peer and the reason.
"""

from __future__ import annotations

import logging

from common import logs
from common.logs import SAFE_FIELDS, JsonFormatter

__all__ = ["SAFE_FIELDS", "JsonFormatter", "setup"]


def setup(level: str = "INFO") -> None:
    """Before grpc is imported (it reads its trace settings once)."""
    logs.setup(level, "keyward-ca", grpc_handshakes=True)
    # psycopg's pool logs connection errors that may quote server messages.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
