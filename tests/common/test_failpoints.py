"""common.failpoints: a name arms itself and every point below it; a stopped process is frozen there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from tests.helpers import ROOT, stopped_at_failpoint, wait_for


def test_a_name_arms_the_points_below_it_and_no_other() -> None:
    code = ("from common import failpoints as f; "
            "print(f.armed('ca.reply.UpdatePolicy'), f.armed('ca.reply'), f.armed('ca.replyX'), f.armed('dbops.x'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30,
                         env={**os.environ, "KEYWARD_FAILPOINTS": "ca.reply, other"}).stdout.split()
    assert out == ["True", "True", "False", "False"]


def test_an_armed_point_stops_the_process_and_an_unarmed_one_does_nothing() -> None:
    code = ("from common import failpoints as f; f.point('ca.reply.Get'); print('past', flush=True); "
            "f.point('dbops.failover.fenced'); print('never', flush=True)")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "KEYWARD_FAILPOINTS": "dbops.failover"})
    try:
        wait_for(lambda: stopped_at_failpoint(p.pid), 30, "the process to stop at its failpoint")
        os.kill(p.pid, signal.SIGKILL)
        out, err = p.communicate(timeout=30)
        assert out.decode().split() == ["past"]
        assert b"failpoint dbops.failover.fenced reached" in err
    finally:
        p.kill()
