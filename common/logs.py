"""One log format for every keyward process: JSON lines on stderr.

Every line is one JSON object with ``time`` (RFC 3339, UTC, milliseconds), ``level`` (debug,
info, warning, error, critical) and ``logger``:

* a message that is itself a JSON object (the ZEN's access lines) gives its fields first, then
  time, level and logger: ``{"org": "acme", "method": "GET", ..., "time": ..., "level": ...}``;
* any other message is ``{"msg": ..., "time": ..., "level": ..., "logger": ...}``;
* then the ``extra`` fields named in :data:`SAFE_FIELDS`, and no other: log calls pass ids,
  never objects that could hold key material;
* an exception adds ``exc_type`` and ``exc_frames`` (``file:line function``): never its
  arguments, its message or any local, which could quote a secret.

:func:`setup` also routes file descriptor 2 through a pipe read by a thread, so that what is
written there without Python's logging (gRPC's C core, a crash's traceback, child processes,
which inherit fd 2) becomes JSON lines too (:mod:`common.stderr`). Python's own records go
straight to the real stderr.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import queue
import select
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import Any

from common.stderr import HANDSHAKE_TRACE, StderrLines, rfc3339

SAFE_FIELDS = ("method", "code", "actor", "org_id", "key_id", "pool", "duration_ms", "port", "peer", "reason",
               "setting", "status", "master_check", "event_loop")
"""The ``extra`` fields a line may carry; anything else passed as ``extra`` is left out."""

MAX_FRAMES = 30


def frames(tb: TracebackType | None) -> list[str]:
    """``file:line function`` of each frame, innermost last (no source text, no locals)."""
    out = []
    for frame, lineno in traceback.walk_tb(tb):
        path = frame.f_code.co_filename.replace(os.sep, "/").split("/")
        out.append(f"{'/'.join(path[-2:])}:{lineno} {frame.f_code.co_name}")
    return out[-MAX_FRAMES:]


def _as_object(msg: str) -> dict[str, Any] | None:
    if not (msg.startswith("{") and msg.endswith("}")):
        return None
    try:
        obj = json.loads(msg)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


class JsonLine:
    """A message that is a JSON object, kept as the object: the formatter takes it as it is, and
    its text (``str()``, which ``LogRecord.getMessage`` and any other handler use) is made only
    if asked for. What the formatter writes is the same as for the text."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        return json.dumps(self.fields)


def _line_encoder() -> Callable[[dict[str, Any]], str]:
    """``json.dumps(fields, default=str)``, the same text, with json's C encoder made once:
    ``json.dumps`` makes an encoder per call, half of its time for a log line (a line per request
    in the ZEN). Without circular-reference checks: a line's fields are a dict the caller built."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # no C accelerator: json's own
        return lambda fields: json.dumps(fields, default=str)
    encode = make(None, str, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True)
    return lambda fields: "".join(encode(fields, 0))


to_json = _line_encoder()


def log_fields(logger: logging.Logger, fields: dict[str, Any], level: int = logging.INFO) -> None:
    """``logger.log(level, json.dumps(fields))``, for lines written per request (the ZEN's access
    lines): the same record, the same line, without the caller's frame looked up (no format here
    shows it) nor the JSON parsed again."""
    if not logger.isEnabledFor(level):
        return
    handler = _only_json_handler(logger, level)
    if handler is not None:  # what the record would come to, without the record: the same line
        assert isinstance(handler.formatter, JsonFormatter)
        out = dict(fields)
        out["time"] = _rfc3339(time.time())
        out["level"] = logging.getLevelName(level).lower()
        out["logger"] = handler.formatter.program if logger.name == "root" and handler.formatter.program \
            else logger.name
        handler.sink.write_line(to_json(out))
        return
    logger.handle(logger.makeRecord(logger.name, level, "", 0, JsonLine(fields), (), None))


def _only_json_handler(logger: logging.Logger, level: int) -> JsonHandler | None:
    """The one handler a record of ``logger`` at ``level`` would reach, when that is a
    :class:`JsonHandler` with its own formatter and nothing on the way filters (setup's case);
    else None (a test's capture, a filter: the record goes the usual way)."""
    found: JsonHandler | None = None
    c: logging.Logger | None = logger
    while c is not None:
        if c.filters:
            return None
        for h in c.handlers:
            if found is not None or type(h) is not JsonHandler or h.filters or level < h.level \
                    or type(h.formatter) is not JsonFormatter:
                return None
            found = h
        c = c.parent if c.propagate else None
    if found is None or logging.root.manager.disable >= level:
        return None
    return found


_second: tuple[int, str] = (0, "")


def _rfc3339(t: float) -> str:
    """:func:`rfc3339`, the formatted second kept (lines come many a second)."""
    global _second
    s = int(t)
    if _second[0] != s:
        _second = (s, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)))
    return _second[1] + f".{int(t * 1000) % 1000:03d}Z"


class JsonFormatter(logging.Formatter):
    """A record as one JSON line (see the module)."""

    def __init__(self, program: str = "") -> None:
        super().__init__()
        self.program = program

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        if isinstance(record.msg, JsonLine) and not record.args:
            out: dict[str, Any] | None = dict(record.msg.fields)
        else:
            msg = record.getMessage()
            out = _as_object(msg)
            if out is None:
                out = {"msg": msg}
        assert out is not None
        out["time"] = _rfc3339(record.created)
        out["level"] = record.levelname.lower()
        out["logger"] = self.program if record.name == "root" and self.program else record.name
        for f in SAFE_FIELDS:
            if hasattr(record, f):
                out[f] = getattr(record, f)
        ref = getattr(record, "k8s_ref", None)  # kopf's per-object loggers: which object
        if isinstance(ref, dict) and ref.get("name"):
            out["object"] = "/".join(str(ref[k]) for k in ("kind", "namespace", "name") if ref.get(k))
        if record.exc_info and record.exc_info[0] is not None:
            t = record.exc_info[0]
            out["exc_type"] = t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
            out["exc_frames"] = frames(record.exc_info[2])
        return out

    def format(self, record: logging.LogRecord) -> str:
        return to_json(self.fields(record))


class Sink:
    """Whole lines to a file descriptor, one ``write`` each, under one lock (the handler and the
    stderr thread share it, so lines never interleave)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()

    def write_line(self, line: str) -> None:
        self._write((line + "\n").encode("utf-8", "backslashreplace"))

    def _write(self, raw: bytes) -> None:
        data = memoryview(raw)
        with self._lock:
            while data:
                try:
                    data = data[os.write(self.fd, data):]
                except InterruptedError:
                    continue
                except OSError:
                    return  # stderr is gone: nothing left to tell


QUEUE_LINES = 16384
"""Lines a :class:`QueuedSink` holds for its writer at most (about 4 MiB of access lines)."""
GATHER_SECONDS = 0.01
"""How long a :class:`QueuedSink`'s writer, woken by a line, lets more come before it writes: one
wake-up and one ``write`` for the lines of 10 ms. Each line costs its caller one C call
(``SimpleQueue.put``): a Condition's notify per line cost the ZEN 4% more instructions per
keep-alive request (bench/zen_cpu.py --callgrind)."""


class QueuedSink(Sink):
    """Whole lines to a file descriptor, written by a thread of their own: a caller never waits
    for the descriptor (the ZEN's event loop writes a line per request, and a log reader that
    stops, its pipe full, would otherwise stop every connection of every org).

    Lines keep their order. When ``limit`` lines wait already, a line is dropped and counted;
    once the writer has written what waited, it writes one line saying how many were dropped
    (``dropped``). :meth:`close` writes what waits (bounded) and stops the thread; a line after
    it is written at once, as by a plain :class:`Sink`."""

    def __init__(self, fd: int, limit: int = QUEUE_LINES) -> None:
        super().__init__(fd)
        self.limit = limit
        self.dropped_total = 0
        self._lines: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._dropped = 0
        self._drops = threading.Lock()  # taken only when a line is dropped, and by the writer
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="keyward-log-writer", daemon=True)
        self._thread.start()

    def write_line(self, line: str) -> None:
        if self._closed:  # a line of the process's last moments (after close): written at once
            super().write_line(line)
            return
        if self._lines.qsize() >= self.limit:
            with self._drops:
                self._dropped += 1
                self.dropped_total += 1
            return
        self._lines.put((line + "\n").encode("utf-8", "backslashreplace"))

    def _run(self) -> None:
        closing = False
        while not closing:
            first = self._lines.get()
            if first is not None:
                time.sleep(GATHER_SECONDS)  # more lines join this write
            parts = [first]
            with contextlib.suppress(queue.Empty):
                while True:
                    parts.append(self._lines.get_nowait())
            closing = None in parts
            # Whole lines, at most PIPE_BUF bytes a write (a line longer goes alone, as from a plain
            # Sink): a larger write to a pipe may be split and interleaved with another process's
            # lines (the ZEN's workers and its supervisor share one).
            chunk: list[bytes] = []
            size = 0
            for line in parts:
                if line is None:
                    continue
                if chunk and size + len(line) > select.PIPE_BUF:
                    self._write(b"".join(chunk))
                    chunk, size = [], 0
                chunk.append(line)
                size += len(line)
            if chunk:
                self._write(b"".join(chunk))
            with self._drops:
                dropped, self._dropped = self._dropped, 0
            if dropped:
                Sink.write_line(self, to_json({
                    "msg": f"{dropped} log lines dropped: the log's reader did not keep up",
                    "time": rfc3339(time.time()), "level": "warning", "logger": "keyward.logs", "dropped": dropped}))

    def close(self, timeout: float = 2.0) -> None:
        """Write what waits (at most ``timeout`` seconds: a reader that never reads again must
        not hold the process's exit), then stop the writer."""
        self._lines.put(None)
        self._thread.join(timeout)
        self._closed = True


class JsonHandler(logging.Handler):
    def __init__(self, sink: Sink, formatter: JsonFormatter) -> None:
        super().__init__()
        self.sink = sink
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.sink.write_line(line)


class _Pump:
    """fd 2 -> pipe -> this thread -> JSON lines -> the real stderr."""

    def __init__(self, sink: Sink, lines: StderrLines) -> None:
        self.sink, self.lines = sink, lines
        r, w = os.pipe()
        sys.stderr.flush()
        os.dup2(w, 2)  # inheritable: child processes write into the pipe too
        os.close(w)
        self._r = r
        self._mark = b"\0keyward-stderr-drained-" + os.urandom(8).hex().encode()
        self._drained = threading.Event()
        self.thread = threading.Thread(target=self._run, name="keyward-stderr", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._r, 65536)
            except InterruptedError:
                continue
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
            *whole, buf = buf.split(b"\n")
            if len(buf) > 65536:  # no newline in sight: write what there is
                whole, buf = [*whole, buf], b""
            for raw in whole:
                if raw == self._mark:
                    self._flush()
                    self._drained.set()
                else:
                    self._emit(raw)
        if buf:
            self._emit(buf)
        self._flush()
        self._drained.set()
        os.close(self._r)

    def _flush(self) -> None:
        for line in self.lines.flush():
            self.sink.write_line(line)

    def _emit(self, raw: bytes) -> None:
        try:
            for line in self.lines.feed(raw.decode("utf-8", "backslashreplace")):
                self.sink.write_line(line)
        except Exception:  # never lose the line over a conversion bug
            self.sink.write_line(json.dumps({"msg": raw.decode("utf-8", "backslashreplace"),
                                             "time": rfc3339(time.time()), "level": "info", "logger": "stderr"}))

    def close(self, timeout: float = 2.0) -> None:
        """At exit: put the real stderr back on fd 2, then wait (bounded) until the thread has
        written everything this process put into the pipe before: a mark sent after it comes out
        last. Child processes still alive may hold the pipe open, so EOF is not waited for."""
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        w = os.dup(2)
        os.dup2(self.sink.fd, 2)
        try:
            os.write(w, b"\n" + self._mark + b"\n")  # ends a last line without a newline, too
        except OSError:
            pass
        finally:
            os.close(w)
        self._drained.wait(timeout)


_pump: _Pump | None = None
_sink: Sink | None = None


def _excepthook(t: type[BaseException], e: BaseException, tb: TracebackType | None) -> None:
    if issubclass(t, KeyboardInterrupt):
        sys.__excepthook__(t, e, tb)
        return
    logging.getLogger().critical("uncaught exception, exiting", exc_info=(t, e, tb))


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread else "?"
    if args.exc_value is None:
        logging.getLogger().critical("uncaught exception in thread %s", name, extra={"reason": args.exc_type.__name__})
        return
    logging.getLogger().critical("uncaught exception in thread %s", name,
                                 exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def lines_fd() -> int | None:
    """The descriptor this process's records are written to (its real stderr), once set up."""
    return _sink.fd if _sink is not None else None


def setup(level: str | int, program: str, *, capture_stderr: bool = True, grpc_handshakes: bool = False,
          lines_fd: int | None = None, queued: bool = False) -> None:
    """JSON lines on stderr for this process (idempotent: a second call changes the level).

    ``program`` names the root logger's records. ``capture_stderr``: route fd 2 through the
    converting thread (off in a process whose fd 2 is already a keyward process's pipe, such as
    the ZEN's signers). ``grpc_handshakes``: a gRPC server's failed TLS handshakes become one line
    each with the peer and the reason; this turns gRPC's handshaker trace on, so it must be called
    before grpc is imported. ``lines_fd``: where this process's records go, when not fd 2 (a
    keyward process's real stderr, :func:`lines_fd`, handed to a child whose fd 2 is its pipe: the
    records skip the converting thread; each is one ``write``). ``queued``: lines are written by a
    thread of their own (:class:`QueuedSink`), so no caller ever waits for the log's reader.
    """
    global _pump, _sink
    if grpc_handshakes:
        have = [t for t in os.environ.get("GRPC_TRACE", "").split(",") if t]
        if HANDSHAKE_TRACE not in have and "all" not in have:
            os.environ["GRPC_TRACE"] = ",".join([*have, HANDSHAKE_TRACE])
    if _sink is None:
        real = lines_fd if lines_fd is not None else os.dup(2) if capture_stderr else 2
        _sink = QueuedSink(real) if queued else Sink(real)
        if isinstance(_sink, QueuedSink):
            atexit.register(_sink.close)  # after the converting thread's close (atexit runs last first)
        if capture_stderr:
            _pump = _Pump(_sink, StderrLines(handshakes=grpc_handshakes))
            atexit.register(_pump.close)
        sys.excepthook = _excepthook
        threading.excepthook = _thread_excepthook
        logging.captureWarnings(True)
    # No format here shows a record's thread or process: not collected (logging's documented
    # optimisations), as the caller's frame is not looked up for log_fields' lines.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [JsonHandler(_sink, JsonFormatter(program))]
    root.setLevel(level)
