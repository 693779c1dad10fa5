"""The chart's Postgres start script, run for real after a failover.

The script (rendered by helm from postgres-configmap.yaml) is what brings a
server back in a cluster. Here the old primary of three real Postgres
servers, failed over with the failover code and left as Kubernetes leaves it
(pod gone, data directory untouched), is started by that script with the
operator's role ConfigMap naming the new primary. It must come back as a
standby (pg_rewind), stream from the new primary and confirm writes: never a
second primary.

What differs from a pod, and only that: the peer's DNS name becomes
127.0.0.1 (the port comes from PGPORT), the mounted files live in a temp
folder, and the official image's docker-entrypoint.sh is a one-line stand-in
that execs postgres with the script's arguments, on the data directory with the server's own port and
socket folder (in a cluster every pod has its own address and port 5432;
here pg_rewind copies the new primary's port setting along with its files).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dbops import local
from dbops.binaries import bindir, chown_server, run
from dbops.failover import failover
from devstack.pg import PgCluster
from tests.helm.test_chart import render
from tests.helpers import three_servers, wait_for


@pytest.fixture
def cluster(workdir: Path) -> Iterator[PgCluster]:
    # Under the session's workdir: the postgres user must reach it (pytest's tmp_path is root-only).
    yield from three_servers(workdir / f"pg-start-{uuid.uuid4().hex[:6]}")


def _script() -> str:
    cm = next(d for d in render() if d["kind"] == "ConfigMap" and "start.sh" in d.get("data", {}))
    return str(cm["data"]["start.sh"])


def test_old_primary_restarted_by_the_start_script_comes_back_as_a_standby(cluster: PgCluster) -> None:
    spec = cluster.spec()
    old = cluster.primary()
    before = uuid.uuid4().hex
    old.psql("CREATE TABLE ledger (v text)")
    old.psql(f"INSERT INTO ledger VALUES ('{before}')")  # acknowledged by ANY 2 / remote_apply
    local.kill_node(spec.node(old.name))
    # The failover as the operator runs it in a cluster: no access to the old primary's files.
    rep = failover(spec, fence=lambda n, _p: local.kill_node(n), rejoin=False)
    new = next(n for n in cluster.nodes if n.name == rep.new_primary)

    # The pod's mounts: the role ConfigMap and the passwords Secret.
    pw = {line.split(":")[3]: line.split(":", 4)[4] for line in cluster.passfile.read_text().splitlines()}
    run = cluster.root / "pod"
    (run / "role").mkdir(parents=True)
    (run / "db").mkdir()
    (run / "role" / "primary").write_text(new.name)
    (run / "db" / "replication-password").write_text(pw["replicator"])
    (run / "db" / "postgres-password").write_text(pw["postgres"])
    (run / "bin").mkdir()
    entry = run / "bin" / "docker-entrypoint.sh"
    # The script's own arguments go to postgres as in the image ("postgres" itself dropped).
    entry.write_text('#!/bin/sh\nshift\nexec postgres "$@" -D "$PGDATA" -p "$OWN_PORT" '
                     '-c unix_socket_directories="$OWN_SOCKETS"\n')
    entry.chmod(0o755)
    text = _script()
    for a, b in {'peer="${primary}.${svc}"': 'peer="127.0.0.1"',
                 "/etc/keyward-role/primary": str(run / "role" / "primary"),
                 "/run/keyward/db/": f"{run / 'db'}/", "/tmp/pgpass": str(run / "pgpass")}.items():
        assert a in text, f"the start script no longer contains {a!r}"
        text = text.replace(a, b)
    script = run / "start.sh"
    script.write_text(text)
    for p in [run, *run.rglob("*")]:
        chown_server(p)

    log = open(run / "start.log", "wb")  # noqa: SIM115 (closed in finally)
    env = {"HOSTNAME": old.name, "PGDATA": str(old.datadir), "PGPORT": str(new.port),
           "OWN_PORT": str(old.port), "OWN_SOCKETS": str(old.root),
           "PATH": f"{run / 'bin'}:{bindir()}:/usr/bin:/bin"}
    cmd = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    proc = subprocess.Popen([*cmd, "env", *(f"{k}={v}" for k, v in env.items()), "sh", str(script)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        def in_recovery() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"start.sh exited {proc.returncode}:\n{(run / 'start.log').read_text()}")
            try:
                return old.psql("SELECT pg_is_in_recovery()", dbname="postgres") == "t"
            except Exception:
                return False
        try:
            wait_for(in_recovery, 60, "the old primary to come back in recovery")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{(run / 'start.log').read_text()[-3000:]}") from None
        wait_for(lambda: new.psql("SELECT state FROM pg_stat_replication WHERE application_name = "
                                  f"'{old.name}'", dbname="postgres") == "streaming", 60,
                 "the old primary streaming from the new one")
        after = uuid.uuid4().hex
        new.psql(f"INSERT INTO ledger VALUES ('{after}')")
        wait_for(lambda: old.psql(f"SELECT count(*) FROM ledger WHERE v IN ('{before}', '{after}')") == "2", 30,
                 "both rows on the old primary")
        out = (run / "start.log").read_text()
        assert "pg_rewind: Done!" in out  # rewound, not re-cloned
        assert old.psql("SHOW cluster_name", dbname="postgres") == old.name  # the script's own -c arguments
        assert "primary_conninfo" in (old.datadir / "postgresql.auto.conf").read_text()
    finally:
        local.kill_node(spec.node(old.name))
        proc.wait(30)
        log.close()


def test_initdb_scripts_and_replication_settings_are_accepted_by_postgres(workdir: Path) -> None:
    """01-include.sh, as the image runs it after initdb, makes postgres read the chart's keyward.conf:
    the real server parses it and reports the synchronous settings."""
    cm = next(d for d in render() if d["kind"] == "ConfigMap" and "start.sh" in d.get("data", {}))
    root = workdir / f"pg-conf-{uuid.uuid4().hex[:6]}"
    root.mkdir()
    chown_server(root)
    conf = root / "keyward.conf"
    conf.write_text(cm["data"]["keyward.conf"])
    run("initdb", "-D", str(root / "data"), "-U", "postgres", "--auth-local=trust")
    include = cm["data"]["01-include.sh"].replace("/etc/keyward/keyward.conf", str(conf))
    cmd = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    r = subprocess.run([*cmd, "env", f"PGDATA={root / 'data'}", "sh", "-c", include], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    for setting, want in (("synchronous_commit", "remote_apply"), ("wal_log_hints", "on"),
                          ("synchronous_standby_names", 'ANY 2 ("kw-keyward-postgres-0", "kw-keyward-postgres-1", '
                                                        '"kw-keyward-postgres-2")')):
        p = run("postgres", "-D", str(root / "data"), "-C", setting)
        assert p.stdout.strip() == want, (setting, p.stdout, p.stderr)
