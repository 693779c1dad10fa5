"""common.logs.log_fields: the line written per request is the line ``logger.info(json.dumps(...))``
writes, byte for byte (the object kept beside its text, no caller lookup)."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import pytest

from common import logs
from common.logs import JsonFormatter, JsonHandler, JsonLine, Sink, log_fields


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


def test_with_only_the_json_handler_the_line_is_written_directly_and_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    r, w = os.pipe()
    log = logging.getLogger("test.log_fields.fast")
    log.propagate = False
    log.handlers = [JsonHandler(Sink(w), JsonFormatter("zen"))]
    log.setLevel(logging.INFO)
    fields = {"org": "acme", "connect": "a.test:443", "sni": None, "status": 502, "reason": "caf\u00e9"}
    made: list[logging.LogRecord] = []
    real = logging.Logger.makeRecord

    def spy(self: logging.Logger, *a: Any, **k: Any) -> logging.LogRecord:
        made.append(real(self, *a, **k))
        return made[-1]
    monkeypatch.setattr(logging.Logger, "makeRecord", spy)
    monkeypatch.setattr(logs.time, "time", lambda: 1_700_000_000.123)
    try:
        log_fields(log, fields)
        line = os.read(r, 65536).decode()
        assert made == []  # no record made
        rec = real(log, log.name, logging.INFO, "", 0, json.dumps(fields), (), None)
        rec.created = 1_700_000_000.123
        assert line == JsonFormatter("zen").format(rec) + "\n"
        log.addFilter(lambda rec: True)  # anything on the way: the usual path
        log_fields(log, fields)
        assert len(made) == 1 and os.read(r, 65536).decode() == line
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("fields", [
    {},
    {"org": "acme", "method": "GET", "host": "shop.example", "path": "/a?b=c", "status": 200, "bytes": 1024,
     "protocol": "http/1.1", "stream": None, "ok": True, "no": False},
    {"msg": 'quote " backslash \\ tab \t newline \n nul \x00 é 漢 \U0001f600', "n": -1, "big": 10 ** 30},
    {"f": 1.5, "nan": float("nan"), "inf": float("inf"), "minus": float("-inf"), "zero": -0.0},
    {"list": [1, "two", None, [3.0]], "dict": {"a": {"b": []}}, "tuple": (1, 2)},
    {"obj": ValueError("an object: its str()"), "path": os.sep, "bytes": b"\xff", 3: "int key", None: "none key"},
])
def test_to_json_writes_what_json_dumps_writes(fields: dict[Any, Any]) -> None:
    """Log lines are encoded by json's C encoder made once (json.dumps makes one per call): the
    same text as ``json.dumps(fields, default=str)``, whatever the fields hold."""
    assert logs.to_json(fields) == json.dumps(fields, default=str)
