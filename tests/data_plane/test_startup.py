"""A ZEN that cannot start says why in ONE JSON line naming the setting, file or port, and exits 2
(no traceback): real `python -m data_plane` processes, no CA needed (they stop before it)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from devstack import pki

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("zen-start")
    pki.init(d)
    (d / "master.key").write_bytes(os.urandom(48))
    (d / "short.key").write_bytes(b"too short")
    (d / "garbage.pem").write_text("not a certificate\n")
    return {"KEYWARD_ZEN_TLS_CERT_FILE": str(d / "zen-public.crt"), "KEYWARD_ZEN_TLS_KEY_FILE": str(d / "zen-public.key"),
            "KEYWARD_ZEN_CA_TRUST_FILE": str(d / "ca.crt"), "KEYWARD_MASTER_SECRET_FILE": str(d / "master.key"),
            "KEYWARD_REQUIRE_MLOCK": "false", "KEYWARD_CA_ADDR": "127.0.0.1:1",
            "KEYWARD_ZEN_LISTEN": "127.0.0.1:0", "KEYWARD_ZEN_METRICS_LISTEN": "127.0.0.1:0",
            "dir": str(d)}


def _start(files: dict[str, str], **env: str) -> str:
    """The one error line of a ZEN that refused to start."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARD_")}
    full.update({k: v for k, v in files.items() if k.startswith("KEYWARD_")})
    full.update(env)
    r = subprocess.run([sys.executable, "-m", "data_plane"], cwd=ROOT, env=full, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr)
    recs = [json.loads(ln) for ln in r.stderr.splitlines()]  # JSON lines only: no traceback
    errors = [x for x in recs if x["level"] == "error"]
    assert len(errors) == 1 and errors[0]["logger"] == "keyward.zen", recs
    assert "Traceback" not in r.stderr and r.stdout == ""
    return str(errors[0]["msg"])


def test_a_missing_file_is_named(files: dict[str, str]) -> None:
    assert _start(files, KEYWARD_ZEN_TLS_CERT_FILE="/x") == "KEYWARD_ZEN_TLS_CERT_FILE=/x: no such file"
    assert _start(files, KEYWARD_MASTER_SECRET_FILE="/nonexistent/m") == \
        "KEYWARD_MASTER_SECRET_FILE=/nonexistent/m: no such file"
    assert _start(files, KEYWARD_ZEN_EXTRA_ROOTS_FILE="/nope.pem") == "KEYWARD_ZEN_EXTRA_ROOTS_FILE=/nope.pem: no such file"
    assert _start(files, KEYWARD_ZEN_CA_TRUST_FILE=files["dir"]) == \
        f"KEYWARD_ZEN_CA_TRUST_FILE={files['dir']}: is a directory"


def test_a_file_that_does_not_hold_what_it_must_is_named(files: dict[str, str]) -> None:
    garbage = f"{files['dir']}/garbage.pem"
    assert _start(files, KEYWARD_ZEN_TLS_CERT_FILE=garbage) == f"KEYWARD_ZEN_TLS_CERT_FILE={garbage}: not a PEM certificate"
    assert _start(files, KEYWARD_ZEN_TLS_KEY_FILE=garbage) == \
        f"KEYWARD_ZEN_TLS_KEY_FILE={garbage}: not a PEM private key (unencrypted)"
    assert _start(files, KEYWARD_ZEN_EXTRA_ROOTS_FILE=garbage) == \
        f"KEYWARD_ZEN_EXTRA_ROOTS_FILE={garbage}: no PEM certificate in it"
    short = f"{files['dir']}/short.key"
    assert _start(files, KEYWARD_MASTER_SECRET_FILE=short).startswith(
        f"KEYWARD_MASTER_SECRET_FILE={short}: master secret is shorter than 32 bytes")


def test_a_port_in_use_is_named(files: dict[str, str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = f"127.0.0.1:{s.getsockname()[1]}"
        assert _start(files, KEYWARD_ZEN_LISTEN=taken) == f"KEYWARD_ZEN_LISTEN={taken}: address already in use"
        assert _start(files, KEYWARD_ZEN_METRICS_LISTEN=taken) == \
            f"KEYWARD_ZEN_METRICS_LISTEN={taken}: address already in use"


def test_a_bad_value_is_named(files: dict[str, str]) -> None:
    assert _start(files, KEYWARD_ZEN_MAX_KEYS="lots") == "KEYWARD_ZEN_MAX_KEYS=lots: not an integer"
    assert _start(files, KEYWARD_ZEN_LEAF_HOURS="0") == "KEYWARD_ZEN_LEAF_HOURS=0: out of range 1..720"
    assert _start(files, KEYWARD_REQUIRE_MLOCK="maybe") == "KEYWARD_REQUIRE_MLOCK=maybe: not a boolean (true or false)"
    assert _start(files, KEYWARD_ZEN_LISTEN="8080") == "KEYWARD_ZEN_LISTEN=8080: not host:port (a port from 0 to 65535)"
    assert _start(files, KEYWARD_ZEN_RESOLVE="good.test") == "KEYWARD_ZEN_RESOLVE: entry 'good.test' is not host=ip"
    missing = _start(files, KEYWARD_ZEN_TLS_KEY_FILE="")
    assert missing.startswith("missing required settings: KEYWARD_ZEN_TLS_KEY_FILE"), missing


def test_help_lists_every_setting() -> None:
    from data_plane.config import settings

    r = subprocess.run([sys.executable, "-m", "data_plane", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "usage: keyward-zen" in r.stdout
    for env, _, _, _ in settings():
        assert f"  {env}  (" in r.stdout, env
    assert "KEYWARD_ZEN_MAX_KEYS  (keys; default 16)" in r.stdout


def test_readme_has_the_settings_table() -> None:
    """README's "Configuration of the ZEN" is generated (python scripts/zen-settings.py rewrites it)."""
    from data_plane.config import settings_markdown

    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- zen-settings: generated by scripts/zen-settings.py -->\n", "\n<!-- /zen-settings -->"
    assert begin in readme and end in readme
    table = readme.split(begin, 1)[1].split(end, 1)[0]
    assert table == settings_markdown(), "README's ZEN settings differ from data_plane/config.py: run " \
                                         "python scripts/zen-settings.py"
