"""A real ZEN whose log reader stops reading (its stderr a pipe left full) keeps serving.

The ZEN writes an access line per request on its event loop. With a plain ``write``, once the
pipe's 64 KiB are full the loop stopped in that ``write``, and with it every connection of every
org. Its lines now go through ``common.logs.QueuedSink``: a thread of their own writes them,
nobody waits for the reader, and what its bound cannot hold is dropped, counted and said."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import CAProcess, Clients, OrgRoot
from tests.integration.flow import PROXY_SECRET
from tests.integration.test_zen import ROOT, Web, org, web, zen_env  # noqa: F401 (fixtures)

REQUESTS = 1500
"""Each an access line of about 200 bytes: 300 KB, several times what the pipe holds."""


def _listening(proc: subprocess.Popen[bytes], deadline: float = 30.0) -> int:
    """The ZEN's port, from its log; after it, nobody reads the pipe any more."""
    assert proc.stderr is not None
    got, end = b"", time.monotonic() + deadline
    while True:
        assert time.monotonic() < end and proc.poll() is None, got[-2000:]
        if select.select([proc.stderr], [], [], 0.5)[0]:
            got += os.read(proc.stderr.fileno(), 1 << 16)
        for line in got.decode(errors="replace").splitlines():
            if line.startswith("{") and '"ZEN listening"' in line:
                return int(json.loads(line)["port"])


def test_a_zen_whose_log_reader_stopped_keeps_serving(ca: CAProcess, pki_dir: Path, master_secret: tuple[bytes, Path],
                                                      web: Web, org: tuple[str, OrgRoot, Clients]) -> None:  # noqa: F811
    org_id, root, _ = org
    proc = subprocess.Popen([sys.executable, "-m", "data_plane"], env=zen_env(ca, pki_dir, master_secret[1], web),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        port = _listening(proc)
        url = f"https://good.test:{web.port}/ok"
        # One curl, one tunnel, REQUESTS requests in turn (curl reuses the intercepted connection).
        try:
            r = subprocess.run(["curl", "-sS", "--max-time", "120", "--proxy", f"http://127.0.0.1:{port}",
                                "--proxy-user", f"{org_id}:{PROXY_SECRET}", "--cacert", str(root.crt), "-w",
                                "%{http_code}\n", *[a for _ in range(REQUESTS) for a in ("-o", "/dev/null", url)]],
                               capture_output=True, text=True, timeout=150)
        except subprocess.TimeoutExpired:
            pytest.fail("the ZEN stopped answering while nobody read its log", pytrace=False)
        codes = r.stdout.split()
        assert r.returncode == 0 and codes == ["200"] * REQUESTS, (r.returncode, r.stderr[-500:], codes[-3:])
        assert proc.poll() is None
    finally:
        proc.terminate()
        # What waited is written at exit: the reader reads again now, and every line is JSON.
        _, out = proc.communicate(timeout=30)
    lines = [json.loads(x) for x in out.decode().splitlines() if x.strip()]
    served = [x for x in lines if x.get("path") == "/ok" and x.get("status") == 200]
    dropped = sum(x.get("dropped", 0) for x in lines)
    assert len(served) + dropped >= REQUESTS, (len(served), dropped)
