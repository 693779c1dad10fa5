"""Structured (JSON lines) logging for the CA.

Log calls pass ids, never objects that could hold key material; the
formatter writes only the message, level, logger and explicit ``extra``
fields from :data:`SAFE_FIELDS`.
"""

from __future__ import annotations

import json
import logging
import sys
import time

SAFE_FIELDS = ("method", "code", "actor", "org_id", "key_id", "pool", "duration_ms", "port", "peer")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for f in SAFE_FIELDS:
            if hasattr(record, f):
                out[f] = getattr(record, f)
        if record.exc_info and record.exc_info[0] is not None:
            # The type and the frames, never exception arguments or locals.
            out["exc_type"] = record.exc_info[0].__name__
        return json.dumps(out, separators=(",", ":"))


def setup(level: str) -> None:
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [h]
    root.setLevel(level)
    # psycopg's pool logs connection errors that may quote server messages.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
