"""common.logs.log_fields: the line written per request is the line ``logger.info(json.dumps(...))``
writes, byte for byte (the object kept beside its text, no caller lookup)."""

from __future__ import annotations

import json
import logging

from common.logs import JsonFormatter, JsonLine, log_fields


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_the_same_line_as_json_dumps_through_info() -> None:
    log = logging.getLogger("test.log_fields")
    keep = _Keep()
    log.addHandler(keep)
    log.setLevel(logging.INFO)
    try:
        fields = {"org": "acme", "method": "GET", "host": "a.test", "path": "/x?y=1", "status": 200, "bytes": 12,
                  "sni": None, "blocked": True, "reason": "caf\u00e9 \"quoted\""}
        log.info(json.dumps(fields))
        log_fields(log, fields)
        old, new = keep.records
        fmt = JsonFormatter("zen")
        new.created, new.msecs = old.created, old.msecs
        assert fmt.format(new) == fmt.format(old)
        assert new.getMessage() == old.getMessage() == json.dumps(fields)  # what other handlers see
        assert isinstance(new.msg, JsonLine)
        log.setLevel(logging.WARNING)
        log_fields(log, fields)  # below the level: nothing
        assert len(keep.records) == 2
    finally:
        log.removeHandler(keep)
