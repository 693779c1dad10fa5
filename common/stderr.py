"""Lines written to file descriptor 2 by anything but Python's logging, made JSON.

gRPC's C core logs with absl straight to fd 2 (``E1130 04:17:00.123456  123 file.cc:45] message``),
Python prints tracebacks there, child processes inherit it. :mod:`common.logs` routes fd 2 through
a pipe and hands each line to :class:`StderrLines`, which returns the JSON lines to write:

* a line that is already a JSON object passes through unchanged;
* an absl line becomes ``{"msg", "time", "level" (I/W/E/F: info/warning/error/critical),
  "logger": "grpc", "source": "file.cc:45"}``; the lines absl continues it with (an error's
  "=== Source Location Trace" and indented lines) keep its level and logger;
* a Python traceback becomes one line per traceback line, level error, logger "stderr";
* anything else is ``{"msg", "time", "level": "info", "logger": "stderr"}``.

With ``handshakes=True`` (a gRPC server that turned on gRPC's ``handshaker`` trace, see
:data:`HANDSHAKE_TRACE`) the trace is read instead of written: each failed TLS handshake becomes
ONE line naming the peer and the reason (``"reason": "client presented no certificate"``), and
the trace lines of every handshake, failed or not, are dropped. gRPC cannot answer such a client
with a status (there is no HTTP/2 before the handshake), so this line is what the server can say.
"""

from __future__ import annotations

import json
import re
import time

HANDSHAKE_TRACE = "handshaker"
"""The gRPC tracer (GRPC_TRACE) whose lines name the peer of a failed handshake."""

ABSL = re.compile(r"([IWEF])(\d{4}) (\d\d:\d\d:\d\d\.\d+)\s+(\d+) ([^\s:\]]+):(\d+)\] ?(.*)\Z")
_ABSL_LEVEL = {"I": "info", "W": "warning", "E": "error", "F": "critical"}
_PEER = re.compile(r"endpoint_peer_address=(?:ipv4:|ipv6:|unix:)?([^,}\s]+)")
_SSL_REASON = re.compile(r"OPENSSL_internal:([A-Z0-9_]+)(?:: ([^:]+))?")
_CHAIN = ("During handling of the above exception, another exception occurred:",
          "The above exception was the direct cause of the following exception:")


def rfc3339(t: float) -> str:
    """UTC, milliseconds: 2025-11-30T04:17:00.123Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def handshake_reason(error: str) -> tuple[str, str]:
    """(level, reason) of a failed TLS handshake from gRPC's error text."""
    m = _SSL_REASON.search(error)
    if m is None:
        if "Socket closed" in error or "end of file" in error.lower():
            return "info", "connection closed before the TLS handshake completed"
        return "warning", f"TLS handshake failed: {error.strip()[:200]}"
    code, detail = m.group(1), (m.group(2) or "").strip()
    if code == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "warning", "client presented no certificate"
    if code in ("CERTIFICATE_VERIFY_FAILED", "TLSV1_ALERT_UNKNOWN_CA"):
        return "warning", f"client certificate not accepted: {detail or code.lower()}"
    if code in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST"):
        return "warning", "client did not speak TLS"
    return "warning", f"TLS handshake failed: {code.lower().replace('_', ' ')}"


class StderrLines:
    """Turns raw stderr lines into JSON lines; keeps the little state continuations need."""

    def __init__(self, *, handshakes: bool = False) -> None:
        self.handshakes = handshakes
        self._cont: str | None = None  # level of the absl message being continued
        self._in_tb = False
        self._hs_cont = False  # continuation lines of a handshake trace line: dropped
        self._pending: str | None = None  # error of a failed handshake whose peer is still to come

    @staticmethod
    def _line(msg: str, level: str, logger: str, now: float, **extra: object) -> str:
        out: dict[str, object] = {"msg": msg, "time": rfc3339(now), "level": level, "logger": logger}
        out.update(extra)
        return json.dumps(out)

    def _summary(self, now: float, peer: str | None) -> str:
        assert self._pending is not None
        level, reason = handshake_reason(self._pending)
        self._pending = None
        return self._line("TLS handshake refused" if level == "warning" else "TLS handshake not completed",
                          level, "grpc", now, peer=peer or "unknown", reason=reason)

    def flush(self, now: float | None = None) -> list[str]:
        """What is still held back (a handshake failure whose peer line never came)."""
        return [self._summary(time.time() if now is None else now, None)] if self._pending is not None else []

    def feed(self, raw: str, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        line = raw.rstrip("\r\n")
        if not line.strip():
            return []
        out: list[str] = []
        m = ABSL.match(line)
        if self.handshakes:
            if m is None and self._hs_cont and (line[0].isspace() or line.startswith(("=== Source Location", "src/"))):
                peer = _PEER.search(line)
                if peer is not None and self._pending is not None:
                    out.append(self._summary(now, peer.group(1)))
                return out
            if self._pending is not None:  # the peer line never came
                out.append(self._summary(now, None))
            self._hs_cont = False
            if m is not None and self._handshake_line(m):
                self._hs_cont, self._cont = True, None
                return out
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                self._cont, self._in_tb = None, False
                return [*out, line]
        if m is not None:
            self._cont, self._in_tb = _ABSL_LEVEL[m.group(1)], False
            return [*out, self._line(m.group(7), self._cont, "grpc", now, source=f"{m.group(5)}:{m.group(6)}")]
        if line.startswith("WARNING: All log messages before absl::InitializeLog()"):
            self._cont = None
            return [*out, self._line(line, "info", "grpc", now)]
        if line.startswith("Traceback (most recent call last):") or line in _CHAIN:
            self._in_tb, self._cont = True, None
            return [*out, self._line(line, "error", "stderr", now)]
        if self._in_tb:
            if not line[0].isspace():
                self._in_tb = False  # the exception's own line ends the traceback
            return [*out, self._line(line, "error", "stderr", now)]
        if self._cont is not None and (line[0].isspace() or line.startswith(("=== Source Location", "src/"))):
            return [*out, self._line(line, self._cont, "grpc", now)]
        self._cont = None
        return [*out, self._line(line, "info", "stderr", now)]

    def _handshake_line(self, m: re.Match[str]) -> bool:
        """A line of gRPC's handshaker trace (dropped); remembers a failure."""
        source, msg = m.group(5), m.group(7)
        if source == "handshaker.cc":
            if msg.startswith("CallNextHandshakerLocked: error=") and not msg.startswith(
                    "CallNextHandshakerLocked: error=OK "):
                self._pending = msg.removeprefix("CallNextHandshakerLocked: error=")
            return True
        if source == "channel_trace.h" and msg.startswith("handshake manager"):
            return True
        if source == "ssl_transport_security.cc" and msg.startswith("Handshake failed with error"):
            return True  # the same error comes with the peer on handshaker.cc's line
        return source == "trace.cc" and msg.startswith("gRPC Tracers:")
