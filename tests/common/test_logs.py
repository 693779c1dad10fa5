"""The one log format (common.logs): fields and their order, exceptions as type and frames only,
and fd 2 made JSON (gRPC's C core, tracebacks, child processes) in a real child process."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

from common.logs import JsonFormatter
from common.stderr import StderrLines, handshake_reason

ROOT = Path(__file__).resolve().parents[2]
TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def _record(msg: str, *args: object, level: int = logging.INFO, name: str = "keyward.test",
            exc: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("secret-argument-4711")
        except ValueError:
            exc_info = sys.exc_info()
    r = logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)
    for k, v in extra.items():
        setattr(r, k, v)
    return r


def test_plain_message_fields_and_order() -> None:
    line = JsonFormatter().format(_record("dropped key of %s (%s)", "acme", "revoked", level=logging.WARNING))
    rec = json.loads(line)
    assert list(rec) == ["msg", "time", "level", "logger"]
    assert rec["msg"] == "dropped key of acme (revoked)" and rec["level"] == "warning" and rec["logger"] == "keyward.test"
    import re
    assert re.fullmatch(TIME, rec["time"]), rec["time"]


def test_json_object_message_fields_come_first() -> None:
    msg = json.dumps({"org": "acme", "method": "GET", "path": "/hello", "status": 200})
    line = JsonFormatter().format(_record(msg))
    assert line.startswith('{"org": "acme", "method": "GET"') and '"path": "/hello"' in line
    assert list(json.loads(line)) == ["org", "method", "path", "status", "time", "level", "logger"]
    listening = JsonFormatter().format(_record(json.dumps({"msg": "ZEN listening", "port": 8080})))
    assert '"ZEN listening"' in listening and json.loads(listening)["port"] == 8080


def test_only_safe_extras_and_the_root_logger_named_by_the_program() -> None:
    rec = json.loads(JsonFormatter("keyward-zen").format(
        _record("x", name="root", port=1, org_id="acme", password="hunter2")))
    assert rec["logger"] == "keyward-zen" and rec["port"] == 1 and rec["org_id"] == "acme"
    assert "password" not in rec and "hunter2" not in json.dumps(rec)


def test_exception_logs_type_and_frames_never_its_arguments() -> None:
    line = JsonFormatter().format(_record("failed", exc=True, level=logging.ERROR))
    rec = json.loads(line)
    assert rec["exc_type"] == "ValueError"
    assert rec["exc_frames"] and rec["exc_frames"][-1].startswith("common/test_logs.py:")
    assert "secret-argument-4711" not in line


def test_kopf_object_reference() -> None:
    rec = json.loads(JsonFormatter().format(_record("reconciled", k8s_ref={
        "apiVersion": "keyward.io/v1", "kind": "ZenPool", "name": "public", "namespace": "keyward"})))
    assert rec["object"] == "ZenPool/keyward/public"


def test_stderr_lines() -> None:
    c = StderrLines()
    [absl] = c.feed("E1130 04:17:00.123456  123 x.cc:45] boom", now=0.0)
    assert json.loads(absl) == {"msg": "boom", "time": "1970-01-01T00:00:00.000Z", "level": "error",
                                "logger": "grpc", "source": "x.cc:45"}
    [cont] = c.feed("=== Source Location Trace: === ")
    assert json.loads(cont)["level"] == "error" and json.loads(cont)["logger"] == "grpc"
    assert c.feed('{"msg": "already", "level": "info"}') == ['{"msg": "already", "level": "info"}']
    assert c.feed("") == []
    assert json.loads(c.feed("W1130 04:17:00.1 1 y.cc:2] hm")[0])["level"] == "warning"
    assert json.loads(c.feed("F1130 04:17:00.1 1 y.cc:2] dead")[0])["level"] == "critical"
    other = json.loads(c.feed("something else")[0])
    assert other["logger"] == "stderr" and other["level"] == "info"
    tb = [json.loads(x) for raw in ("Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
                                    "ValueError: x", "after") for x in c.feed(raw)]
    assert [t["level"] for t in tb] == ["error", "error", "error", "info"]


def test_failed_handshakes_become_one_line_with_peer_and_reason() -> None:
    c = StderrLines(handshakes=True)
    raw = [
        "I1130 04:20:19.000000   21494 trace.cc:91] gRPC Tracers: handshaker",
        "I1130 04:20:19.1 21524 handshaker.cc:80] handshake_manager 0x7f: adding handshaker security [0x7f] at index 1",
        "I1130 04:20:19.138876   21524 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL: "
        "error:100000c0:SSL routines:OPENSSL_internal:PEER_DID_NOT_RETURN_A_CERTIFICATE: Invalid certificate "
        "verification context",
        "I1130 04:20:19.138954   21524 handshaker.cc:155] CallNextHandshakerLocked: error=UNKNOWN: Ssl handshake "
        "failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000c0:SSL routines:OPENSSL_internal:"
        "PEER_DID_NOT_RETURN_A_CERTIFICATE: Invalid certificate verification context: OK",
        "=== Source Location Trace: === ",
        "src/core/util/status_helper.cc:68",
        " shutdown=false index=2, args={endpoint=0x7f, args={grpc.internal.endpoint_local_address=ipv4:127.0.0.1:1, "
        "grpc.internal.endpoint_peer_address=ipv4:127.0.0.1:35674, grpc.internal.security_connector=0x5}}",
        "I1130 04:20:19.139000   21524 channel_trace.h:396] handshake manager 0x7f: Failed with error: UNKNOWN: x",
        "=== Source Location Trace: === ",
        "src/core/util/status_helper.cc:68",
        "E1130 04:20:19.2 1 other.cc:1] unrelated",
    ]
    out = [json.loads(x) for r in raw for x in c.feed(r)]
    assert len(out) == 2, out
    assert out[0]["peer"] == "127.0.0.1:35674" and out[0]["reason"] == "client presented no certificate"
    assert out[0]["level"] == "warning" and out[0]["logger"] == "grpc" and out[0]["msg"] == "TLS handshake refused"
    assert out[1]["msg"] == "unrelated"
    assert handshake_reason("...OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: certificate has expired: OK") == (
        "warning", "client certificate not accepted: certificate has expired")
    assert handshake_reason("UNAVAILABLE: Handshake read failed (Socket closed)")[0] == "info"


CHILD = textwrap.dedent("""
    import logging, os, subprocess, sys, threading
    from common.logs import setup
    setup("INFO", "keyward-test")
    logging.getLogger("keyward.test").info("python line")
    os.write(2, b"E1130 04:17:00.123456 1 x.cc:1] boom\\n")
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
    print("a print to stderr", file=sys.stderr)
    subprocess.run([sys.executable, "-c", "import os; os.write(2, b'from a child\\\\n')"], check=True)
    if sys.argv[1] == "grpc":
        import grpc
        grpc.insecure_channel("127.0.0.1:1").close()  # gRPC's core starts, and warns that DEBUG is on
    if sys.argv[1] == "crash":
        raise RuntimeError("crash-secret-0815")
    os.write(2, b"the last line, without a newline")
""")


def _child(mode: str, **env: str) -> tuple[int, list[str]]:
    import os
    r = subprocess.run([sys.executable, "-c", CHILD, mode], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, **env})
    return r.returncode, r.stderr.splitlines()


def test_a_process_writes_only_json_lines_to_stderr() -> None:
    code, lines = _child("grpc", GRPC_VERBOSITY="debug")
    assert code == 0
    recs = [json.loads(ln) for ln in lines]  # every line is JSON
    assert all({"time", "level", "logger"} <= set(r) for r in recs), recs
    by_msg = {r.get("msg"): r for r in recs}
    assert by_msg["python line"]["logger"] == "keyward.test"
    assert by_msg["boom"]["level"] == "error" and by_msg["boom"]["logger"] == "grpc"
    assert by_msg["a print to stderr"]["logger"] == "stderr"
    assert "from a child" in by_msg
    assert "the last line, without a newline" in by_msg  # flushed at exit
    assert any(r["logger"] == "grpc" and r.get("source", "").startswith("log.cc") for r in recs)  # gRPC's own


def test_a_crash_is_one_json_line_with_the_type_and_no_argument() -> None:
    code, lines = _child("crash")
    assert code == 1
    recs = [json.loads(ln) for ln in lines]
    crash = [r for r in recs if r.get("exc_type") == "RuntimeError"]
    assert len(crash) == 1 and crash[0]["level"] == "critical" and crash[0]["exc_frames"], recs
    assert "crash-secret-0815" not in "\n".join(lines)


def _drain(r: int, until: bytes, deadline: float = 30.0) -> bytes:
    """What the pipe's reader gets until ``until`` has come (bounded)."""
    import os
    import select
    import time

    got = b""
    end = time.monotonic() + deadline
    while until not in got:
        assert time.monotonic() < end, f"{until!r} never came; last: {got[-300:]!r}"
        if select.select([r], [], [], 0.5)[0]:
            got += os.read(r, 1 << 16)
    return got


def test_a_queued_sink_never_waits_for_a_reader_that_stopped() -> None:
    """The ZEN writes a line per request on its event loop: with a reader that stopped reading
    (a pipe full), a plain ``write`` would stop every connection. A QueuedSink's callers never
    wait; what its bound cannot hold is dropped, counted, and said in one line once the reader
    reads again. Lines keep their order."""
    import os
    import threading

    from common.logs import QueuedSink

    r, w = os.pipe()
    sink = QueuedSink(w, limit=200)
    n = 5000
    def write_all() -> None:
        for i in range(n):
            sink.write_line(f'{{"n": {i}, "pad": "{"x" * 80}"}}')
    writer = threading.Thread(target=write_all)
    writer.start()
    writer.join(30)  # the pipe (64 KiB) is full long before the 500 KB are written
    assert not writer.is_alive(), "a caller waited for the log's reader"
    assert sink.dropped_total > 0
    out = _drain(r, b"log lines dropped")
    sink.close()
    os.close(w)
    while chunk := os.read(r, 1 << 16):
        out += chunk
    os.close(r)
    lines = [json.loads(x) for x in out.decode().splitlines()]
    numbers = [x["n"] for x in lines if "n" in x]
    assert numbers == sorted(numbers) and numbers[0] == 0
    markers = [x for x in lines if "dropped" in x]  # one each time the writer caught up after drops
    assert sum(x["dropped"] for x in markers) == sink.dropped_total == n - len(numbers)
    assert all(x["level"] == "warning" and x["msg"] == f"{x['dropped']} log lines dropped: the log's reader "
               "did not keep up" for x in markers)


def test_a_queued_sink_writes_what_waits_when_closed() -> None:
    import os

    from common.logs import QueuedSink

    r, w = os.pipe()
    sink = QueuedSink(w)
    for i in range(100):
        sink.write_line(json.dumps({"n": i}))
    sink.close()
    sink.write_line(json.dumps({"n": 100}))  # after close (an atexit handler's line): written at once
    os.close(w)
    out = b""
    while chunk := os.read(r, 1 << 16):
        out += chunk
    os.close(r)
    assert [json.loads(x)["n"] for x in out.decode().splitlines()] == list(range(101))
    assert sink.dropped_total == 0


def test_two_queued_sinks_on_one_pipe_never_tear_a_line() -> None:
    """The ZEN's workers and its supervisor write to one pipe (the supervisor's stderr), each
    through its own QueuedSink. A write of more than PIPE_BUF bytes to a pipe may be split and
    interleaved with another writer's: a sink's batches are whole lines of at most PIPE_BUF bytes
    per write, so every line arrives whole."""
    import os
    import threading
    import time

    from common.logs import QueuedSink

    r, w = os.pipe()
    sinks = [QueuedSink(w), QueuedSink(w)]
    n = 3000

    def write_all(k: int) -> None:
        for i in range(n):
            sinks[k].write_line(json.dumps({"sink": k, "n": i, "pad": "x" * 150}))
    writers = [threading.Thread(target=write_all, args=(k,)) for k in (0, 1)]
    for t in writers:
        t.start()
    out = b""
    end = time.monotonic() + 60
    while out.count(b"\n") < 2 * n:  # a slow reader: the pipe stays full, writes are split
        assert time.monotonic() < end, out.count(b"\n")
        out += os.read(r, 1000)
    for t in writers:
        t.join(10)
    for s in sinks:
        s.close()
    os.close(w)
    os.close(r)
    lines = [json.loads(x) for x in out.decode().splitlines()]  # a torn line does not parse
    for k in (0, 1):
        assert [x["n"] for x in lines if x["sink"] == k] == list(range(n))
