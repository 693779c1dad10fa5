"""devstack.stack: Postgres data where the postgres user can reach it, from any clone location."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from devstack import stack


def test_pg_data_leaves_a_folder_postgres_cannot_enter(monkeypatch: pytest.MonkeyPatch) -> None:
    tmp_path = Path(tempfile.mkdtemp(dir="/var/tmp"))  # pytest's own tmp_path sits in a 0700 folder
    closed = tmp_path / "home"
    (closed / "clone").mkdir(parents=True)
    open_ = tmp_path / "open"
    (open_ / "clone").mkdir(parents=True)
    os.chmod(tmp_path, 0o755)
    os.chmod(closed, 0o700)  # like /root, or a `mktemp -d` folder
    os.chmod(open_, 0o755)
    monkeypatch.setattr(stack, "RUN", open_ / "clone" / ".run")
    assert stack.pg_root() == open_ / "clone" / ".run" / "pg"
    monkeypatch.setattr(stack, "RUN", closed / "clone" / ".run")
    if os.geteuid() == 0:  # Postgres runs as the postgres user: it could not enter the clone
        assert str(stack.pg_root()).startswith("/var/tmp/keyward-pg-")
    else:  # Postgres runs as the caller, who can
        assert stack.pg_root() == closed / "clone" / ".run" / "pg"
    shutil.rmtree(tmp_path)
