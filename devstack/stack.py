"""The local stack: ``make up`` / ``make down`` (``python -m devstack.stack``).

``up`` starts, in the background: three Postgres servers (a primary and two
synchronous standbys, data in .run/pg), the CA (``keyward serve``, log in
.run/logs/ca.log), the backup agent (.run/logs/backup-agent.log), the failover
watcher (``keyward db watch``, .run/logs/db-watch.log: a lost primary is replaced by
itself), registers
the dev ZEN pools ``public`` and ``private``, and writes ``.run/env``. The master secret is
generated into a memory-backed file under /dev/shm (the local stand-in for a
Kubernetes Secret on a tmpfs volume); it never touches the disk.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from devstack import pki
from devstack.pg import PgCluster

ROOT = Path(__file__).resolve().parent.parent
RUN = Path(os.environ.get("KEYWARD_RUN_DIR") or ROOT / ".run").resolve()
PG_PORT = int(os.environ.get("KEYWARD_PG_PORT", "55432"))
CA_ADDR = os.environ.get("KEYWARD_CA_ADDR", "127.0.0.1:50051")
METRICS_ADDR = os.environ.get("KEYWARD_METRICS_ADDR", "127.0.0.1:9464")


def secret_dir() -> Path:
    return Path("/dev/shm") / f"keyward-{os.getuid()}-{hashlib.sha256(str(RUN).encode()).hexdigest()[:10]}"


def grpcurl_bin() -> str:
    exe = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    if not exe:
        raise SystemExit("grpcurl not found: run `make venv`")
    return exe


def grpcurl(pki_dir: Path, who: str, method: str, data: str | None = None, addr: str = CA_ADDR,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
    cmd = [grpcurl_bin(), "-max-time", str(int(timeout)), "-cacert", str(pki_dir / "ca.crt"),
           "-cert", str(pki_dir / f"{who}.crt"), "-key", str(pki_dir / f"{who}.key")]
    if data is not None:
        cmd += ["-d", data]
    cmd += [addr, method]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 5)


def ca_env(pg: PgCluster, pki_dir: Path, master_file: Path, listen: str, metrics: str) -> dict[str, str]:
    return {
        "KEYWARD_AUDIT_SPOOL_FILE": str(pg.root / "ca-audit-spool.jsonl"),
        "KEYWARD_CA_LISTEN": listen,
        "KEYWARD_DB_DSN": pg.dsn(),
        "KEYWARD_TLS_CERT_FILE": str(pki_dir / "server.crt"),
        "KEYWARD_TLS_KEY_FILE": str(pki_dir / "server.key"),
        "KEYWARD_CLIENT_CA_FILE": str(pki_dir / "ca.crt"),
        "KEYWARD_MASTER_SECRET_FILE": str(master_file),
        "KEYWARD_METRICS_LISTEN": metrics,
    }


def make_master_secret(d: Path) -> Path:
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    f = d / "master.key"
    if not f.exists():
        fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(os.urandom(48))
    return f


def wait_healthy(pki_dir: Path, addr: str, proc: subprocess.Popen[bytes] | None, log: Path,
                 timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"CA exited with {proc.returncode}; see {log}:\n{log.read_text()[-2000:]}")
        r = grpcurl(pki_dir, "platform-admin", "grpc.health.v1.Health/Check", "{}", addr=addr, timeout=5)
        if '"SERVING"' in r.stdout:
            return
        last = (r.stderr or r.stdout).strip()
        time.sleep(0.3)  # poll interval of a bounded wait
    raise SystemExit(f"CA not healthy after {timeout}s: {last}")


def ensure_free(addr: str, what: str) -> None:
    """Exit with a message a person can act on when ``addr`` (host:port) is taken: another clone's
    stack on the same fixed ports failed later as "pg_ctl: could not start server"."""
    host, _, port = addr.rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT is no owner
        try:
            s.bind((host, int(port)))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            raise SystemExit(
                f"{what} cannot listen on {addr}: something else holds that port (another keyward stack? "
                "`make down` in its clone), or choose other ports for this one: KEYWARD_PG_PORT "
                f"(3 ports from it; now {PG_PORT}), KEYWARD_CA_ADDR (now {CA_ADDR}), KEYWARD_METRICS_ADDR "
                f"(now {METRICS_ADDR})") from None


def _alive(name: str) -> bool:
    try:
        os.kill(int((RUN / f"{name}.pid").read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


def up() -> None:
    RUN.mkdir(exist_ok=True)
    (RUN / "logs").mkdir(exist_ok=True)
    pg = cluster()
    for node in pg.nodes:  # before anything starts: this stack's own servers hold theirs
        if not node.running():
            ensure_free(f"127.0.0.1:{node.port}", f"Postgres {node.name}")
    if not _alive("ca"):
        ensure_free(CA_ADDR, "the CA")
        ensure_free(METRICS_ADDR, "the CA's metrics")
    if not pg.initialized():
        print(f"initdb + pg_basebackup: Postgres primary and two synchronous standbys on 127.0.0.1:"
              f"{','.join(map(str, pg.ports))} ({pg.root})")
        pg.init()
    else:
        pg.start()
        pg.wait_synchronous()
    pki_dir = RUN / "pki"
    pki.init(pki_dir)
    master = make_master_secret(secret_dir())
    env = dict(os.environ)
    env.update(ca_env(pg, pki_dir, master, CA_ADDR, METRICS_ADDR))
    env["KEYWARD_DB_CLUSTER"] = str(pg.spec_path)
    # Keeps backups free of retired keys: re-backup and shred after each rotation.
    _spawn("backup-agent", [sys.executable, "-m", "control_plane", "db", "backup-agent"], env)
    # Fails over by itself when the primary is lost (the operator's decisions, outside Kubernetes).
    _spawn("db-watch", [sys.executable, "-m", "control_plane", "db", "watch"], env)
    proc = _spawn("ca", [sys.executable, "-m", "control_plane", "serve"], env)
    log = RUN / "logs" / "ca.log"
    if proc is None:
        print("CA already running")
        write_env(pg, pki_dir, master)
        return
    wait_healthy(pki_dir, CA_ADDR, proc, log)
    for body in ('{"pool": {"name": "public", "visibility": "POOL_VISIBILITY_PUBLIC"}}',
                 '{"pool": {"name": "private", "visibility": "POOL_VISIBILITY_PRIVATE"}}'):
        existing = grpcurl(pki_dir, "platform-admin", "keyward.v1.Admin/ListZenPools", "{}")
        name = body.split('"name": "')[1].split('"')[0]
        if f'"name": "{name}"' in existing.stdout:
            continue
        r = grpcurl(pki_dir, "platform-admin", "keyward.v1.Admin/RegisterZenPool", body)
        if r.returncode != 0:
            raise SystemExit(f"registering pool {name}: {r.stderr}")
    write_env(pg, pki_dir, master)
    print(f"CA up at {CA_ADDR} (pid {proc.pid}); backup agent running; metrics at http://{METRICS_ADDR}/metrics; env in {RUN / 'env'}")


def pg_root() -> Path:
    """Where the three servers keep their data: ``.run/pg``, unless the postgres user cannot reach it
    (as root, Postgres runs as ``postgres``, and a clone in /root or a ``mktemp -d`` folder is 0700).
    Then a folder of its own under /var/tmp, named after this run directory, recorded in
    ``.run/pg-dir`` (``make clean`` removes it too)."""
    inside = RUN / "pg"
    if os.geteuid() != 0 or all(os.stat(d).st_mode & 0o001 for d in RUN.parents if d.exists()):
        return inside
    return Path("/var/tmp") / f"keyward-pg-{hashlib.sha256(str(RUN).encode()).hexdigest()[:10]}"


def cluster() -> PgCluster:
    root = pg_root()
    if root != RUN / "pg":
        RUN.mkdir(parents=True, exist_ok=True)
        if not (RUN / "pg-dir").exists():
            print(f"Postgres data in {root}: the postgres user cannot enter {ROOT} (see .run/pg-dir)")
        (RUN / "pg-dir").write_text(f"{root}\n")
        root.parent.mkdir(parents=True, exist_ok=True)
    return PgCluster(root, (PG_PORT, PG_PORT + 1, PG_PORT + 2))


def write_env(pg: PgCluster, pki_dir: Path, master: Path) -> None:
    lines = {
        "KEYWARD_CA_ADDR": CA_ADDR,
        "KEYWARD_DB_DSN": pg.dsn(),
        "KEYWARD_PKI_DIR": str(pki_dir),
        "KEYWARD_METRICS_ADDR": METRICS_ADDR,
        "KEYWARD_MASTER_SECRET_FILE": str(master),
        "KEYWARD_DB_CLUSTER": str(pg.spec_path),
    }
    # Exported: `source .run/env` must reach the programs a user runs next (keyward db status, grpcurl).
    # The virtualenv's bin folder goes first on PATH (once, however often it is sourced): the
    # README's `keyward`, `keyward-zen` and `grpcurl` are its console scripts.
    bin_dir = Path(sys.executable).parent  # .venv/bin under `make up`; not resolved (a venv's python is a symlink)
    path = (f"case \":$PATH:\" in *':{bin_dir}:'*) ;; *) export PATH='{bin_dir}':\"$PATH\" ;; esac\n")
    (RUN / "env").write_text("".join(f"export {k}='{v}'\n" for k, v in lines.items()) + path)


def _spawn(name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes] | None:
    """Start a background process with a pid file and a log; None if it runs already."""
    pidfile = RUN / f"{name}.pid"
    if pidfile.exists():
        try:
            os.kill(int(pidfile.read_text()), 0)
            return None
        except (ProcessLookupError, ValueError):
            pidfile.unlink()
    with open(RUN / "logs" / f"{name}.log", "ab") as out:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=out, start_new_session=True)
    pidfile.write_text(str(proc.pid))
    return proc


def _stop(name: str) -> None:
    pidfile = RUN / f"{name}.pid"
    if not pidfile.exists():
        return
    try:
        pid = int(pidfile.read_text())
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.1)  # poll interval of a bounded wait
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, ValueError):
        pass
    pidfile.unlink(missing_ok=True)


def down() -> None:
    _stop("db-watch")  # first: stopping the servers must not look like a lost primary
    _stop("ca")
    _stop("backup-agent")
    pg = cluster()
    if pg.initialized():
        pg.stop()
    shutil.rmtree(secret_dir(), ignore_errors=True)
    print("stack stopped (data kept in .run/; `make clean` removes it)")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m devstack.stack")
    ap.add_argument("cmd", choices=["up", "down"])
    a = ap.parse_args()
    up() if a.cmd == "up" else down()


if __name__ == "__main__":
    main()
