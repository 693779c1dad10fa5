"""The README's tutorial, run as written: its ```sh blocks marked ``<!-- tutorial -->``, in order, in
one ``bash -euo pipefail`` session, from ``make up`` to the intercepted curl and ``make down``.

The session runs in a folder of its own that stands in for the clone: its ``.run`` is the stack's
run folder (``KEYWARD_RUN_DIR``), on ports of its own, so ``source .run/env`` works as written and
a stack of the user's is left alone. ``make up`` and ``make down`` are what the Makefile runs
after its prerequisites (``python -m devstack.stack up|down``, from the clone); the venv's bin
folder is not on PATH until ``.run/env`` puts it there, as for a user. The ZEN and the origin the
tutorial starts are stopped by its last block, and by the test (their process group) if it fails.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from devstack.pg import free_port

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARK = "<!-- tutorial -->"
BLOCK = re.compile(r"^" + re.escape(MARK) + r"\n```sh\n(.*?)^```$", re.M | re.S)
FIXED_PORTS = (8080, 8443, 9465)
"""What the tutorial's ZEN (proxy, metrics) and origin listen on, as a user's would."""


def tutorial_blocks(text: str) -> list[str]:
    return BLOCK.findall(text)


def test_marked_blocks_are_found() -> None:
    """A marker must sit right above a ```sh fence: one that does not would be skipped silently."""
    text = README.read_text()
    blocks = tutorial_blocks(text)
    assert blocks, f"no ```sh block marked {MARK} in README.md"
    assert len(blocks) == text.count(MARK) - text.count(f"`{MARK}`"), \
        f"a {MARK} marker in README.md is not directly above a ```sh block"


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to every process of the session's group, SIGKILL to what is left after 15 s."""
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            proc.poll()  # reaps bash itself: a zombie still counts as a member of the group
            os.killpg(pgid, 0)
            time.sleep(0.1)  # poll interval of a bounded wait
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_readme_tutorial_runs_as_written() -> None:
    blocks = tutorial_blocks(README.read_text())
    assert blocks, f"no ```sh block marked {MARK} in README.md"
    script = "\n".join(blocks)
    for must in ("make up", "source .run/env", "keyward db status", "keyward org create", "keyward key upload",
                 "keyward-zen", "curl", "WatchKeys", "make down"):
        assert must in script, f"the README's tutorial blocks no longer contain {must!r}"
    taken = [p for p in FIXED_PORTS if _port_taken(p)]
    assert not taken, f"port(s) {taken} of 127.0.0.1 are in use; the README's tutorial needs them (ZEN, origin)"

    work = Path(tempfile.mkdtemp(prefix="keyward-readme-"))
    os.chmod(work, 0o755)  # Postgres (as the postgres user when root) keeps its data in work/.run/pg
    run = work / ".run"
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
                           if p and p != venv_bin)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARD_")}
    env.update(PATH=path, PYTHONPATH=str(ROOT),  # the console scripts run this checkout's code
               KEYWARD_RUN_DIR=str(run), KEYWARD_PG_PORT=str(free_port()),
               KEYWARD_CA_ADDR=f"127.0.0.1:{free_port()}", KEYWARD_METRICS_ADDR=f"127.0.0.1:{free_port()}")
    make = (f"make() {{\n"
            f"  case \"$*\" in\n"
            f"    up|down) (cd {shlex.quote(str(ROOT))} && {shlex.quote(sys.executable)} -m devstack.stack \"$1\") ;;\n"
            f"    *) echo \"test_readme: no stand-in for make $*\" >&2; return 2 ;;\n"
            f"  esac\n"
            f"}}\n")
    (work / "tutorial.sh").write_text(make + script + "\n")
    out_f, err_f = work / "stdout.txt", work / "stderr.txt"
    proc: subprocess.Popen[bytes] | None = None
    try:
        with open(out_f, "wb") as out, open(err_f, "wb") as err:
            proc = subprocess.Popen(["bash", "-x", "-euo", "pipefail", "tutorial.sh"], cwd=work, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
            try:
                rc = proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                rc = None
        stdout, stderr = out_f.read_text(), err_f.read_text()
        logs = "".join(f"\n--- {p.relative_to(work)}\n{p.read_text(errors='replace')[-2000:]}"
                       for p in [*work.glob("tutorial/*.log"), *run.glob("logs/*.log")])
        report = f"--- stdout\n{stdout[-4000:]}\n--- stderr (bash -x)\n{stderr[-4000:]}{logs}"
        assert rc == 0, f"the README's tutorial failed (exit {rc}, 300 s at most)\n{report}"
        # keyward db status: the three servers, replicating.
        assert re.search(r"^n0 .* primary ", stdout, re.M) and stdout.count(" standby ") >= 2, report
        assert "problems: none" in stdout, report
        assert re.search(r"^\S+ +ACTIVE +1 ", stdout, re.M), report  # keyward key list acme
        # The intercepted curl: s_server's page, under a leaf minted from acme's intermediate.
        assert "s_server -www -accept 127.0.0.1:8443" in stdout, report
        assert "subject: CN=shop.test" in stdout and "issuer: CN=acme keyward intermediate" in stdout, report
        assert "gambling.example/ is blocked by your organization's policy" in stdout, report
        assert '"action": "intercept"' in stdout, report  # the ZEN's access line
        assert "audit chain OK" in stdout, report
        # grpcurl: the sealed key, and WatchKeys replaying acme's events before the client cuts it.
        assert '"keylib_format"' in stdout and "KEY_EVENT_KIND_ROTATED" in stdout, report
        assert "stream cut after 5 s" in stdout, report
        assert "stack stopped" in stdout, report  # make down
    finally:
        if proc is not None:  # the ZEN and the origin, if a block failed before the tutorial's `kill`
            _stop_group(proc)
        d = subprocess.run([sys.executable, "-m", "devstack.stack", "down"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        subprocess.run(["rm", "-rf", str(work)], check=False)
    assert d.returncode == 0, d.stderr


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
