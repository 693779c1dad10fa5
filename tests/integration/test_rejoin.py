"""dbops.local.rejoin against real servers, with a supervisor restarting the server meanwhile.

Found by the fault campaign (seed 879): the watcher rejoined a fenced standby while the harness,
as a supervisor would, restarted it. A start landing between rejoin's kill and its pg_rewind made
the rewind fail, and the fallback clone removed the files of the server just started; the
server then replayed garbage WAL forever ("invalid resource manager ID") and never streamed.
The data directory is now renamed aside while it is rewound or replaced: a start meanwhile fails.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dbops import failover as dbfailover
from dbops import local
from devstack.pg import PgCluster, PgError
from tests.helpers import three_servers, wait_for


@pytest.fixture(scope="module")
def cluster(workdir: Path) -> Iterator[PgCluster]:
    yield from three_servers(workdir / "pg-rejoin")


def test_a_rejoin_survives_a_supervisor_restarting_the_server_meanwhile(cluster: PgCluster) -> None:
    old = cluster.primary()
    cluster.psql("CREATE TABLE IF NOT EXISTS rejoined (n int)")
    cluster.psql("INSERT INTO rejoined VALUES (1)")
    spec = cluster.spec()
    assert local.kill_node(spec.node(old.name))
    rep = dbfailover.failover(spec, rejoin=False)
    new = next(n for n in cluster.nodes if n.name == rep.new_primary)
    stop, starts, refused = threading.Event(), [0], [0]

    def supervisor() -> None:  # systemd's Restart=always, faster: a start every 20 ms
        while not stop.is_set():
            try:
                if not old.running():
                    old.start()
                    starts[0] += 1
            except PgError:
                refused[0] += 1
            stop.wait(0.02)

    log_from = old.logfile.stat().st_size if old.logfile.exists() else 0
    th = threading.Thread(target=supervisor, daemon=True)
    th.start()
    try:
        how = local.rejoin(spec, spec.node(old.name), spec.node(new.name))
    finally:
        stop.set()
        th.join(60)
    assert refused[0] > 0, "the supervisor never tried to start the server during the rejoin"
    with open(old.logfile, "rb") as f:
        f.seek(log_from)
        during = f.read().decode(errors="replace")
    # No server ever ran over files being rewound or replaced.
    assert "PANIC" not in during and "could not open file" not in during, during[-3000:]
    new.psql("INSERT INTO rejoined VALUES (2)")
    cluster.wait_synchronous(60)
    wait_for(lambda: old.running() and old.psql("SELECT string_agg(n::text, ',' ORDER BY n) FROM rejoined") == "1,2",
             60, f"{old.name} ({how}) to stream the new primary's write")
    assert old.psql("SELECT pg_is_in_recovery()", dbname="postgres") == "t"
