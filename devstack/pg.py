"""A real Postgres server started from the installed binaries.

Postgres refuses to run as root: when we are root, every server command runs
as the ``postgres`` user (``runuser``), and the data directory is owned by it.
Local (Unix socket, inside the data directory) connections use ``trust`` for
the superuser tooling; TCP connections need SCRAM passwords. The application
role's password lives in a libpq passfile, so no DSN ever holds it.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path


class PgError(RuntimeError):
    """A Postgres server could not be set up, started or stopped."""


def bindir() -> Path:
    """The newest installed Postgres server binaries."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name),
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise PgError("no Postgres server binaries: run `make deps` (apt-get install postgresql)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_server_user() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _chown_server(path: Path) -> None:
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(path, pw.pw_uid, pw.pw_gid)


@dataclass
class PgServer:
    """One postmaster: ``root`` holds ``data/``, ``server.log`` and ``pgpass``."""

    root: Path
    port: int
    dbname: str = "keyward"
    user: str = "keyward"

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def logfile(self) -> Path:
        return self.root / "server.log"

    @property
    def passfile(self) -> Path:
        return self.root / "pgpass"

    def dsn(self, **extra: str) -> str:
        parts = {
            "host": "127.0.0.1",
            "port": str(self.port),
            "dbname": self.dbname,
            "user": self.user,
            "passfile": str(self.passfile),
            "connect_timeout": "5",
        }
        parts.update(extra)
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def admin_dsn(self, dbname: str | None = None) -> str:
        """Superuser over the Unix socket in the data directory (trust)."""
        return f"host={self.datadir} port={self.port} dbname={dbname or self.dbname} user=postgres"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = _as_server_user() + list(args)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            raise PgError(f"{' '.join(args[:2])} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
        return p

    def initialized(self) -> bool:
        return (self.datadir / "PG_VERSION").exists()

    def init(self) -> None:
        """initdb, configure, start, create the application role and database."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        _chown_server(self.root)
        b = bindir()
        self._run(str(b / "initdb"), "-D", str(self.datadir), "-U", "postgres",
                  "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                  "--locale=C.UTF-8")
        conf = self.datadir / "postgresql.auto.conf"
        with open(conf, "a") as f:
            f.write(
                f"port = {self.port}\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.datadir}'\n"
                "wal_level = replica\n"
                "max_wal_senders = 10\n"
                "max_replication_slots = 10\n"
                "password_encryption = 'scram-sha-256'\n"
                # Never log bind parameters, even on error.
                "log_parameter_max_length_on_error = 0\n"
                "log_parameter_max_length = 0\n"
            )
        self.start()
        password = secrets.token_urlsafe(24)
        self.psql(
            f"CREATE ROLE {self.user} LOGIN PASSWORD '{password}'",
            dbname="postgres",
        )
        self.psql(f"CREATE DATABASE {self.dbname} OWNER {self.user}", dbname="postgres")
        fd = os.open(self.passfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"127.0.0.1:{self.port}:{self.dbname}:{self.user}:{password}\n")

    def running(self) -> bool:
        pid = self.datadir / "postmaster.pid"
        if not pid.exists():
            return False
        p = subprocess.run(_as_server_user() + [str(bindir() / "pg_ctl"), "status", "-D", str(self.datadir)],
                           capture_output=True, text=True, timeout=30)
        return p.returncode == 0

    def start(self) -> None:
        if self.running():
            return
        self._run(str(bindir() / "pg_ctl"), "start", "-D", str(self.datadir), "-l", str(self.logfile),
                  "-w", "-t", "60")

    def stop(self, mode: str = "fast") -> None:
        if not self.datadir.exists() or not self.running():
            return
        self._run(str(bindir() / "pg_ctl"), "stop", "-D", str(self.datadir), "-m", mode, "-w", "-t", "60")

    def psql(self, sql: str, *, dbname: str | None = None) -> str:
        p = self._run(str(bindir() / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                      "-h", str(self.datadir), "-p", str(self.port), "-U", "postgres",
                      "-d", dbname or self.dbname, "-c", sql)
        return p.stdout.strip()

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
