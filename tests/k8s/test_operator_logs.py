"""The operator writes JSON lines like every keyward process: its own, kopf's (with the object
they are about), and a configuration error as one line with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_bad_setting_is_one_json_line_and_exit_2() -> None:
    env = {**os.environ, "KEYWARD_OPERATOR_INTERVAL": "soon"}
    r = subprocess.run([sys.executable, "-m", "k8s.operator"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stderr
    [line] = [json.loads(ln) for ln in r.stderr.splitlines()]
    assert line["msg"] == "KEYWARD_OPERATOR_INTERVAL=soon: not a number (seconds)"  # common.env's form
    assert line["level"] == "error" and line["logger"] == "keyward.operator" and "time" in line


def test_kopf_lines_are_json_with_their_object() -> None:
    code = """
import logging
from k8s.operator import main  # what `python -m k8s.operator` sets up
from common.logs import setup
setup("INFO", "keyward-operator")
from kopf._core.actions.loggers import logger
logger.info("Handler 'pool' succeeded.", extra={"k8s_ref": {"kind": "ZenPool", "namespace": "keyward",
                                                            "name": "public"}, "k8s_skip": True})
logging.getLogger("kopf.activities.startup").warning("startup")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(ln) for ln in r.stderr.splitlines()]
    assert lines[0]["logger"] == "kopf.objects" and lines[0]["object"] == "ZenPool/keyward/public"
    assert lines[1]["logger"] == "kopf.activities.startup" and lines[1]["level"] == "warning"
