"""Real Postgres servers started from the installed binaries.

:class:`PgServer` is one postmaster; :class:`PgCluster` is keyward's shape:
a primary and two hot standbys cloned with ``pg_basebackup``, each with a
physical replication slot, the primary naming both in
``synchronous_standby_names = 'ANY 2 (...)'`` with
``synchronous_commit = remote_apply``.

Postgres refuses to run as root: when we are root, every server command runs
as ``postgres``. Unix-socket connections (socket inside each data directory)
use ``trust`` for tooling; TCP needs SCRAM passwords, which live in one libpq
passfile (owned by the server user, mode 0600), never in a DSN.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from dbops.binaries import PgError, chown_server, run, write_as_server
from dbops.local import postmaster_pid
from dbops.spec import ClusterSpec, Node

__all__ = ["PgError", "PgServer", "PgCluster", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


BASE_CONF = """
listen_addresses = '127.0.0.1'
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
hot_standby = on
# Off: standby snapshots must not hold back the removal of a deleted key's row.
hot_standby_feedback = off
wal_log_hints = on
# A retired key's bytes must not linger in recycled WAL segments, nor in segments
# kept beyond the checkpoint that follows its deletion (docs/database.md).
wal_recycle = off
wal_init_zero = on
wal_keep_size = 0
synchronous_commit = remote_apply
password_encryption = 'scram-sha-256'
# Never log bind parameters, even on error.
log_parameter_max_length_on_error = 0
log_parameter_max_length = 0
wal_sender_timeout = 10s
wal_receiver_timeout = 10s
wal_retrieve_retry_interval = 1s
"""


@dataclass
class PgServer:
    """One postmaster: ``root`` holds ``data/``, ``server.log`` and the socket."""

    root: Path
    port: int
    dbname: str = "keyward"
    user: str = "keyward"
    name: str = "n0"
    passfile_path: Path | None = None
    host: str = "127.0.0.1"
    """The address it listens on (and is reached at)."""
    netns: str = ""
    """The network namespace it runs in (dbops.spec.Node.netns); empty: ours."""

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def logfile(self) -> Path:
        return self.root / "server.log"

    @property
    def passfile(self) -> Path:
        return self.passfile_path or (self.root / "pgpass")

    def dsn(self, **extra: str) -> str:
        parts = {"host": self.host, "port": str(self.port), "dbname": self.dbname, "user": self.user,
                 "passfile": str(self.passfile), "connect_timeout": "5"}
        parts.update(extra)
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def admin_dsn(self, dbname: str | None = None) -> str:
        """Superuser over the Unix socket in the data directory (trust)."""
        return f"host={self.root} port={self.port} dbname={dbname or self.dbname} user=postgres"

    def initialized(self) -> bool:
        return (self.datadir / "PG_VERSION").exists()

    def _prepare_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        chown_server(self.root)

    def _node_conf(self) -> str:
        # The socket lives beside, not inside, the data directory: pg_rewind
        # copies the source's data directory and cannot read a socket.
        return (f"listen_addresses = '{self.host}'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.root}'\ncluster_name = '{self.name}'\n")

    def init(self, passwords: dict[str, str] | None = None) -> None:
        """initdb, configure, start; create the roles and the database."""
        self._prepare_root()
        # Data checksums: a page the disk or the file system damaged is an error when read (and
        # pg_basebackup refuses to copy it), not a wrong row served; the standbys are clones.
        run("initdb", "-D", str(self.datadir), "-U", "postgres", "--auth-local=trust",
            "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8", "--data-checksums")
        write_as_server(self.datadir / "postgresql.auto.conf", BASE_CONF + self._node_conf(), append=True)
        if self.host != "127.0.0.1":  # initdb lets only loopback in: also our own subnet (the standbys clone it)
            write_as_server(self.datadir / "pg_hba.conf", "host all all samenet scram-sha-256\n"
                            "host replication all samenet scram-sha-256\n", append=True)
        self.start()
        pw = passwords or {"postgres": secrets.token_urlsafe(24), self.user: secrets.token_urlsafe(24),
                           "replicator": secrets.token_urlsafe(24)}
        self.psql(f"ALTER ROLE postgres PASSWORD '{pw['postgres']}'", dbname="postgres")
        self.psql(f"CREATE ROLE replicator LOGIN REPLICATION PASSWORD '{pw['replicator']}'", dbname="postgres")
        self.psql(f"CREATE ROLE {self.user} LOGIN PASSWORD '{pw[self.user]}'", dbname="postgres")
        self.psql(f"CREATE DATABASE {self.dbname} OWNER {self.user}", dbname="postgres")
        # After retiring a key the CA switches WAL segments and checkpoints every server
        # (docs/database.md; pg_checkpoint: PostgreSQL 15+).
        self.psql(f"GRANT pg_checkpoint TO {self.user}", dbname="postgres")
        self.psql(f"GRANT EXECUTE ON FUNCTION pg_catalog.pg_switch_wal() TO {self.user}")
        if self.passfile_path is None or not self.passfile.exists():
            fd = os.open(self.passfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                for user, secret in pw.items():
                    f.write(f"*:*:*:{user}:{secret}\n")
            chown_server(self.passfile)

    def clone_from(self, upstream: PgServer, spec_passfile: Path) -> None:
        """Become a hot standby of ``upstream`` (pg_basebackup, own slot)."""
        self._prepare_root()
        run("pg_basebackup", "-h", upstream.host, "-p", str(upstream.port), "-U", "replicator",
            "-D", str(self.datadir), "-X", "stream", "-c", "fast", "-C", "-S", self.name,
            env={"PGPASSFILE": str(spec_passfile)})
        self.make_standby_of(upstream)
        self.start()

    def make_standby_of(self, upstream: PgServer) -> None:
        write_as_server(self.datadir / "standby.signal", "")
        write_as_server(
            self.datadir / "postgresql.auto.conf",
            self._node_conf()
            + f"primary_conninfo = 'host={upstream.host} port={upstream.port} user=replicator "
            f"passfile={self.passfile} application_name={self.name} connect_timeout=3'\n"
            f"primary_slot_name = '{self.name}'\n",
            append=True,
        )

    def pid(self) -> int | None:
        return postmaster_pid(Node(self.name, self.host, self.port, str(self.datadir), self.netns))

    def running(self) -> bool:
        return self.pid() is not None

    def start(self) -> None:
        if self.running():
            return
        run("pg_ctl", "start", "-D", str(self.datadir), "-l", str(self.logfile), "-w", "-t", "60", netns=self.netns)

    def stop(self, mode: str = "fast") -> None:
        if not self.datadir.exists() or not self.running():
            return
        run("pg_ctl", "stop", "-D", str(self.datadir), "-m", mode, "-w", "-t", "60", check=False)

    def psql(self, sql: str, *, dbname: str | None = None) -> str:
        p = run("psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", str(self.root),
                "-p", str(self.port), "-U", "postgres", "-d", dbname or self.dbname, "-c", sql, timeout=120)
        return p.stdout.strip()

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class PgCluster:
    """Three servers: ``nodes[0]`` starts as primary, 1 and 2 as standbys."""

    root: Path
    ports: tuple[int, int, int]
    required_sync: int = 2
    nodes: list[PgServer] = field(default_factory=list)
    places: tuple[tuple[str, str], ...] = ()
    """(host, netns) per server, for servers in network namespaces of their own (the fault
    campaign); default: all on 127.0.0.1 in ours."""
    _hint: PgServer | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.nodes:
            places = self.places or (("127.0.0.1", ""),) * len(self.ports)
            self.nodes = [PgServer(self.root / f"n{i}", p, name=f"n{i}", passfile_path=self.root / "pgpass",
                                   host=h, netns=ns) for i, (p, (h, ns)) in enumerate(zip(self.ports, places, strict=True))]

    @property
    def spec_path(self) -> Path:
        return self.root / "cluster.json"

    @property
    def passfile(self) -> Path:
        return self.root / "pgpass"

    def spec(self) -> ClusterSpec:
        return ClusterSpec(
            nodes=tuple(Node(n.name, n.host, n.port, str(n.datadir), n.netns) for n in self.nodes),
            passfile=str(self.passfile), required_sync=self.required_sync,
            backup_dir=str(self.root / "backups"))

    def initialized(self) -> bool:
        return all(n.initialized() for n in self.nodes)

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        chown_server(self.root)
        primary, *standbys = self.nodes
        primary.init()
        for s in standbys:
            s.clone_from(primary, self.passfile)
        primary.psql(f"ALTER SYSTEM SET synchronous_standby_names = '{self.spec().sync_names(primary.name)}'")
        primary.psql("SELECT pg_reload_conf()")
        self.spec().dump(self.spec_path)
        backups = self.root / "backups"
        backups.mkdir(exist_ok=True)
        chown_server(backups)
        self.wait_synchronous()

    def start(self) -> None:
        for n in self.nodes:
            n.start()

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def destroy(self) -> None:
        for n in self.nodes:
            n.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def primary(self) -> PgServer:
        hint = self._hint
        if hint is not None and hint.running():
            try:
                if hint.psql("SELECT pg_is_in_recovery()", dbname="postgres") == "f":
                    return hint
            except PgError:
                pass
        for n in self.nodes:
            if n.running() and n.psql("SELECT pg_is_in_recovery()", dbname="postgres") == "f":
                self._hint = n
                return n
        raise PgError("no running primary")

    def wait_synchronous(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        want = len(self.nodes) - 1
        rows = ""
        while time.monotonic() < deadline:
            try:
                rows = self.primary().psql(
                    "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' "
                    "AND sync_state IN ('sync', 'quorum')", dbname="postgres")
                if rows == str(want):
                    return
            except PgError:
                pass
            time.sleep(0.1)  # poll interval of a bounded wait
        raise PgError(f"standbys not synchronous after {timeout}s ({rows} of {want})")

    # Delegation to the current primary, for code written against one server.
    def dsn(self, **extra: str) -> str:
        return self.spec().app_dsn(read_write=True)

    def psql(self, sql: str, *, dbname: str | None = None) -> str:
        return self.primary().psql(sql, dbname=dbname)

    def admin_dsn(self, dbname: str | None = None) -> str:
        return self.primary().admin_dsn(dbname)
