"""Output: ``-o json`` prints the protobuf message in the canonical proto3 JSON mapping
(field names as in the .proto, enums by name, every field present, 64-bit integers as strings:
what grpcurl prints, stable for scripts); ``-o table`` (the default) prints columns for people."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

FORMATS = ("table", "json")


def _format(value: str) -> str:
    if value not in FORMATS:
        raise argparse.ArgumentTypeError(
            f"{value!r}: -o/--output is the output format (table or json); files are --out FILE")
    return value


def add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", type=_format, default="table", metavar="{table,json}",
                   choices=FORMATS, help="table (for people, default) or json (the API message, for scripts)")


def as_dict(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def print_json(value: Message | dict[str, Any]) -> None:
    print(json.dumps(as_dict(value) if isinstance(value, Message) else value, indent=2))


def ts(t: Timestamp, *, seconds: bool = True) -> str:
    if not t.seconds and not t.nanos:
        return "-"
    s = t.ToDatetime().strftime("%Y-%m-%dT%H:%M:%SZ" if seconds else "%Y-%m-%d")
    return s


def enum(value: str, prefix: str) -> str:
    """``INTERMEDIATE_STATE_ACTIVE`` -> ``ACTIVE`` for tables."""
    return value[len(prefix):] if value.startswith(prefix) else value


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in cells]
    return "\n".join(lines)


def fields(pairs: Sequence[tuple[str, object]]) -> str:
    """``name: value`` lines, aligned."""
    w = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k + ':':<{w + 1}} {v}" for k, v in pairs)


def note(text: str) -> None:
    """A remark for people, on stderr: stdout stays the data (json or table)."""
    print(text, file=sys.stderr)
