"""Postgres server binaries, run as the server's own user.

Postgres refuses to run as root: when we are root, server commands run as
``postgres`` via ``runuser``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
from pathlib import Path


class PgError(RuntimeError):
    """A Postgres command failed; the message carries its stderr."""


def bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise PgError("no Postgres server binaries: run `make deps` (apt-get install postgresql)")


def as_server_user() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def chown_server(path: Path) -> None:
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(path, pw.pw_uid, pw.pw_gid)


def run(tool: str, *args: str, timeout: float = 300, env: dict[str, str] | None = None,
        check: bool = True, netns: str = "", pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run a server binary; in network namespace ``netns`` when given (a postmaster started
    there listens, and is reached, only there)."""
    cmd = (["ip", "netns", "exec", netns] if netns else []) + as_server_user() + [str(bindir() / tool), *args]
    # From "/": the postgres user may not be allowed into the caller's folder (a clone in /root).
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/",
                       env={**os.environ, **(env or {})}, pass_fds=pass_fds)
    if check and p.returncode != 0:
        raise PgError(f"{tool} failed ({p.returncode}): {(p.stderr or p.stdout).strip()[-1500:]}")
    return p


def write_as_server(path: Path, text: str, *, append: bool = False) -> None:
    mode = "a" if append else "w"
    with open(path, mode) as f:
        f.write(text)
    chown_server(path)
