"""The operator's database failover, driven through its trigger (the primary
lost) by the real kopf operator on the KMock API stand-in, with the real
failover code (dbops) against three real Postgres servers.

KMock stands in for the API server: the StatefulSet and its pods are plain
objects there (no kubelet restarts a deleted pod; the servers are local
processes). The operator reads the servers' roles over SQL, as in a cluster.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dbops import local
from devstack.pg import PgCluster
from k8s.operator.dbwatch import ROLE_LABEL
from tests.helpers import three_servers
from tests.k8s.conftest import OperatorFactory
from tests.k8s.kapi import NS, KeywardApi, events, obj, requests, until

pytestmark = pytest.mark.kmock(cls=KeywardApi)


@pytest.fixture(scope="module")
def cluster(workdir: Path) -> Iterator[PgCluster]:
    yield from three_servers(workdir / "pg-operator")


def stateful_set(api: KeywardApi, cluster: PgCluster) -> None:
    """What the chart creates: the StatefulSet, and the pods the StatefulSet controller would run."""
    labels = {"app.kubernetes.io/name": "keyward", "app.kubernetes.io/component": "postgres"}
    api.objects["apps/v1/statefulsets", NS, "keyward-postgres"] = {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "keyward-postgres", "namespace": NS, "labels": labels, "uid": "sts-1",
                     "resourceVersion": "1"}, "spec": {"replicas": 3}}
    for n in cluster.nodes:
        api.objects["v1/pods", NS, n.name] = {"apiVersion": "v1", "kind": "Pod",
                                              "metadata": {"name": n.name, "namespace": NS, "labels": labels}}


def role_of(api: KeywardApi, pod: str) -> str | None:
    p = obj(api, "v1/pods", pod)
    return (p["metadata"].get("labels") or {}).get(ROLE_LABEL) if p is not None else None


def primary_in_configmap(api: KeywardApi) -> str | None:
    cm = obj(api, "v1/configmaps", "keyward-postgres-role")
    return cm["data"]["primary"] if cm is not None else None


async def test_primary_lost_fails_over_with_no_lost_write(
    api: KeywardApi, operator_factory: OperatorFactory, cluster: PgCluster,
) -> None:
    cluster.start()
    cluster.wait_synchronous()
    old = cluster.primary()
    standbys = [n.name for n in cluster.nodes if n.name != old.name]
    stateful_set(api, cluster)
    await operator_factory(pg_cluster_file=str(cluster.spec_path), failover_after=2.0, ca_addr="127.0.0.1:1")

    # Roles repaired to match the server that answers as primary.
    await until(lambda: primary_in_configmap(api) == old.name and role_of(api, old.name) == "primary"
                and all(role_of(api, s) == "standby" for s in standbys), 30, "role ConfigMap and pod labels")

    # A write acknowledged under ANY 2 / remote_apply, then the primary crashes.
    mark = uuid.uuid4().hex
    old.psql("CREATE TABLE IF NOT EXISTS op_ledger (v text)")
    old.psql(f"INSERT INTO op_ledger VALUES ('{mark}')")
    t0 = time.monotonic()
    await asyncio.to_thread(local.kill_node, cluster.spec().node(old.name))

    await until(lambda: events(api, "PrimaryLost"), 20, "a PrimaryLost Event")
    done = await until(lambda: events(api, "FailedOver"), 60, "a FailedOver Event")
    took = time.monotonic() - t0
    new = next(n for n in cluster.nodes if n.name in done[0]["message"].split(" -> ")[1].split(" ")[0])
    assert new.name in standbys
    assert await asyncio.to_thread(new.psql, "SELECT pg_is_in_recovery()", dbname="postgres") == "f"
    assert await asyncio.to_thread(new.psql, f"SELECT count(*) FROM op_ledger WHERE v = '{mark}'") == "1"
    # Not before the set time, and the old primary fenced: role first, then its pod deleted.
    assert took >= 2.0, took
    assert primary_in_configmap(api) == new.name
    deletes = [r for r in requests(api) if r.method == "DELETE" and str(r.url.path).endswith(f"/pods/{old.name}")]
    assert deletes, "the old primary's pod was not deleted"
    # The old primary came back as a standby of the new one (pg_rewind beside it), and all
    # three servers confirm writes again.
    assert "rejoined" in done[0]["message"] and f"fenced {old.name}" in done[0]["message"]
    assert await asyncio.to_thread(old.psql, "SELECT pg_is_in_recovery()", dbname="postgres") == "t"
    await asyncio.to_thread(cluster.wait_synchronous)
    await until(lambda: role_of(api, new.name) == "primary", 20, "the new primary's pod label")
    sts = obj(api, "apps/v1/statefulsets", "keyward-postgres")
    assert sts["metadata"]["annotations"]["keyward.io/primary"] == new.name
    assert not sts["metadata"].get("finalizers")  # `helm uninstall` is never blocked by the operator
    print(f"\nprimary {old.name} killed -> {new.name} promoted and acknowledged-write check passed in "
          f"{took:.2f}s (failover_after=2s)")


async def test_failover_refused_while_no_standby_answers(
    api: KeywardApi, operator_factory: OperatorFactory, cluster: PgCluster,
) -> None:
    """With every server down nothing can be promoted safely: refused, reported once, never forced;
    once a standby answers again the failover goes ahead."""
    cluster.start()
    cluster.wait_synchronous()
    old = cluster.primary()
    stateful_set(api, cluster)
    await operator_factory(pg_cluster_file=str(cluster.spec_path), failover_after=3.0, ca_addr="127.0.0.1:1")
    await until(lambda: primary_in_configmap(api) == old.name, 30, "the role ConfigMap")
    spec = cluster.spec()
    await asyncio.gather(*(asyncio.to_thread(local.kill_node, spec.node(n.name)) for n in cluster.nodes))
    refused = await until(lambda: events(api, "FailoverRefused"), 30, "a FailoverRefused Event")
    assert "only 0 standby(s) answer" in refused[0]["message"]
    assert primary_in_configmap(api) == old.name  # nothing was changed
    back = next(n for n in cluster.nodes if n.name != old.name)
    await asyncio.to_thread(back.start)
    done = await until(lambda: events(api, "FailedOver"), 90, "a FailedOver Event once a standby is back")
    assert f"-> {back.name} " in done[0]["message"]
    assert len(events(api, "FailoverRefused")) == 1
    assert await asyncio.to_thread(back.psql, "SELECT pg_is_in_recovery()", dbname="postgres") == "f"
    await asyncio.to_thread(cluster.start)
    await asyncio.to_thread(cluster.wait_synchronous)


async def test_cluster_derived_from_the_chart(api: KeywardApi, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a spec file the operator derives the cluster from the chart's names and passwords
    Secret; what it writes into the servers names their own passfile, not the operator's."""
    from k8s.operator.config import OperatorConfig
    from k8s.operator.dbwatch import DbWatch
    from k8s.operator.dbwatch import cluster as derive
    from k8s.operator.kube import Endpoint, Kube

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    cfg = OperatorConfig(kube_api=str(api.url), namespace=NS, pg_required_sync=1)
    kube = Kube(Endpoint.resolve(cfg.kube_api))
    try:
        spec = await derive(DbWatch(), cfg, kube)
    finally:
        await kube.close()
    assert [n.host for n in spec.nodes] == [f"keyward-postgres-{i}.keyward-postgres.{NS}.svc" for i in range(3)]
    assert spec.required_sync == 1 and not any(n.datadir for n in spec.nodes)
    assert spec.sync_names("keyward-postgres-0") == 'ANY 1 ("keyward-postgres-1", "keyward-postgres-2")'
    assert spec.slot(spec.nodes[1]) == "keyward_postgres_1"  # as the start script names it
    assert "passfile=/tmp/pgpass " in spec.replication_conninfo(spec.nodes[0], "keyward-postgres-1")
    pf = Path(spec.passfile)
    assert pf.parent == tmp_path and oct(pf.stat().st_mode & 0o777) == "0o600"
    assert pf.read_text() == "*:*:*:postgres:pg-pw\n*:*:*:replicator:repl-pw\n"
