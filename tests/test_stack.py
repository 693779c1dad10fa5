"""devstack.stack: Postgres data where the postgres user can reach it, from any clone location."""

from __future__ import annotations

import os
import shutil
import socket
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


def test_a_port_held_by_another_stack_is_named_before_anything_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two clones' stacks share the fixed ports; the second's `make demo` failed deep inside with
    "pg_ctl: could not start server / Examine the log output" (seen this stop: a bench had left a
    stack up). It now stops first, naming the port and what to do."""
    run = Path(tempfile.mkdtemp(dir="/var/tmp")) / ".run"
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    monkeypatch.setattr(stack, "RUN", run)
    monkeypatch.setattr(stack, "PG_PORT", port)
    try:
        with pytest.raises(SystemExit, match=f"Postgres n0 cannot listen on 127.0.0.1:{port}.*make down"):
            stack.up()
        assert not (run / "pki").exists()  # nothing else was started or made
    finally:
        holder.close()
        shutil.rmtree(run.parent)
