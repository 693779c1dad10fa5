"""Layer rules, checked three ways: the import-linter contracts, the CA's
runtime import graph, and a scan of its source for any decrypt call.

The Central Authority never decrypts: keylib.unwrap is unreachable from it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_linter_contracts_hold() -> None:
    exe = Path(sys.executable).parent / "lint-imports"
    r = subprocess.run([str(exe)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    # Every contract the file declares was evaluated and kept (a contract import-linter skipped,
    # or one dropped from the file, fails here), the CA-never-decrypts one among them.
    import configparser
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / ".importlinter")
    names = [cfg[s]["name"] for s in cfg.sections() if s.startswith("importlinter:contract:")]
    out = " ".join(r.stdout.split())  # long names wrap
    assert "The Central Authority never reaches the opening side of keylib" in names
    for name in names:
        assert f"{name} KEPT" in out, name
    assert f"Contracts: {len(names)} kept, 0 broken." in out


def test_ca_process_cannot_reach_unwrap() -> None:
    """Load the whole CA as `keyward serve` does, install its guard, then try."""
    code = """
import sys, importlib
import control_plane.server, control_plane.cli, control_plane.service, control_plane.store
from keylib.guard import forbid_unwrap
assert 'keylib.unwrap' not in sys.modules, 'the CA imported keylib.unwrap'
forbid_unwrap()
try:
    importlib.import_module('keylib.unwrap')
except ImportError as e:
    print('refused:', e)
else:
    raise SystemExit('keylib.unwrap was importable in the CA process')
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "refused: keylib.unwrap is not available in this process" in r.stdout


def test_guard_refuses_a_process_that_already_decrypts() -> None:
    code = "import keylib.unwrap\nfrom keylib.guard import forbid_unwrap\nforbid_unwrap()"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "must never decrypt" in r.stderr


def test_control_plane_source_has_no_decrypt_call() -> None:
    offenders = []
    for path in (ROOT / "control_plane").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            name = None
            if isinstance(node, ast.Attribute):
                name = node.attr
            elif isinstance(node, ast.Name):
                name = node.id
            if name and ("decrypt" in name.lower() or name in ("open_sealed", "unwrap")):
                offenders.append(f"{path.name}:{node.lineno} {name}")
    assert not offenders, offenders


def test_ca_server_installs_the_guard_before_anything_else() -> None:
    """Drive the real `server.start` far enough to pass its first line, then try."""
    code = """
import asyncio, importlib
from control_plane import server, config
from control_plane.store import Store

class Stop(Exception):
    pass

async def refuse(*a, **k):
    raise Stop()
Store.open = refuse  # no database needed: stop right after the guard
cfg = config.CAConfig(db_dsn="host=x", tls_cert_file="/dev/null", tls_key_file="/dev/null",
                      client_ca_file="/dev/null")
try:
    asyncio.run(server.start(cfg, None))
except Stop:
    pass
try:
    importlib.import_module('keylib.unwrap')
except ImportError:
    print('guarded')
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "guarded" in r.stdout, r.stdout + r.stderr
