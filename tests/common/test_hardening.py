"""common.hardening: the CA, the ZEN, its signers and the operator start with no core dumps and
not dumpable, through one function."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_no_core_dumps_and_not_dumpable() -> None:
    code = """
import resource
from common.hardening import dumpable, no_core_dumps
assert dumpable()
no_core_dumps()
assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)
assert not dumpable()
print('hardened')
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "hardened" in r.stdout, r.stdout + r.stderr


def test_every_process_that_holds_a_secret_calls_it() -> None:
    for path in ("control_plane/cli.py", "data_plane/__main__.py", "data_plane/signer.py", "k8s/operator/main.py"):
        text = (ROOT / path).read_text()
        assert "from common.hardening import no_core_dumps" in text and "no_core_dumps()" in text, path
        assert "prctl" not in text and "RLIMIT_CORE" not in text, path  # no copy of its own
