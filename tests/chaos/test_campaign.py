"""`make chaos`: a seeded fault campaign against three real Postgres servers, the real CA over
mTLS and the watch agent (`keyward db watch`), under a steady load of key-custody writes and
ZEN key reads (tests/chaos/load.py).

Each cycle injects one fault drawn from the seeded RNG, or two at once (tests/chaos/faults.py),
waits (bounded) until the fault is healed and the cluster is back to three servers streaming
with ANY 2 satisfied, then checks, with the writers paused:

* every acknowledged write (its request_log row) is on every server;
* no write was acknowledged while a synchronous standby could not confirm it (RPO 0);
* a write retried with its request_id after an unknown outcome was applied at most once
  (its audit rows, per org and call; the policy versions acknowledged);
* never two servers answered as primary in one sampling round;
* the audit chain verifies (`keyward audit verify`), and every key a ZEN got has its KeySent row;
* ZENs get keys during the fault whenever a server answers: a ZEN read (5 s deadline) that failed
  while some server answered during the call (tests/chaos/monitor.py; a server whose link was cut
  does not count then) and the CA ran is a violation;
* the newest backup restores every live key (tests/chaos/backups.py): made current as the backup
  agent does (`reconcile`), restored into a fresh server, it holds every key row of the primary
  (org, state, sealed key and certificate, compared by sha256) and no retired key. Every
  KEYWARD_CHAOS_BACKUP_EVERY cycles (5; 0: never) and on the last one.

KEYWARD_CHAOS_CYCLES, KEYWARD_CHAOS_SEED (default: random, printed), KEYWARD_CHAOS_STALL
("5-30": SIGSTOP seconds), KEYWARD_CHAOS_AFTER (the watcher's --after, 1),
KEYWARD_CHAOS_BACKUP_EVERY (5). A failing run prints its seed and the command that replays it (the
faults and their timings; not the scheduling).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dbops import status
from devstack.pg import PgCluster, free_port
from protos.keyward.v1 import keyward_pb2 as pb
from tests.chaos import faults
from tests.chaos.backups import EVERY as BACKUP_EVERY
from tests.chaos.backups import BackupCheck, check_newest_backup, due
from tests.chaos.faults import CA, Fault, Watcher
from tests.chaos.load import Load
from tests.chaos.monitor import Monitor
from tests.chaos.places import Places
from tests.helpers import ROOT, OrgRoot, clients, wait_for

CYCLES = int(os.environ.get("KEYWARD_CHAOS_CYCLES", "0") or 0)
SEED = int(os.environ.get("KEYWARD_CHAOS_SEED", "0") or 0) or random.SystemRandom().randrange(1, 10**6)
_lo, _, _hi = os.environ.get("KEYWARD_CHAOS_STALL", "5-30").partition("-")
STALL = (float(_lo), float(_hi or _lo))
AFTER = float(os.environ.get("KEYWARD_CHAOS_AFTER", "1"))
BACK_TIMEOUT = float(os.environ.get("KEYWARD_CHAOS_BACK_TIMEOUT", "180"))
ONLY = tuple(k for k in os.environ.get("KEYWARD_CHAOS_KINDS", "").split(",") if k) or faults.KINDS
unknown_kinds = set(ONLY) - set(faults.KINDS)
assert not unknown_kinds, f"KEYWARD_CHAOS_KINDS: no fault kind {sorted(unknown_kinds)}; kinds: {', '.join(faults.KINDS)}"
TMPFS_MB = int(os.environ.get("KEYWARD_CHAOS_TMPFS_MB", "512"))
WRITE_ACTIONS = ("CreateOrganization", "RequestIntermediateCsr", "UploadIntermediateCertificate", "UpdatePolicy",
                 "RevokeIntermediate")


def replay_command() -> str:
    extra = "" if STALL == (5.0, 30.0) else f" STALL={_lo}-{_hi or _lo}"
    extra += "" if ONLY == faults.KINDS else f" KINDS={','.join(ONLY)}"
    extra += "" if BACKUP_EVERY == 5 else f" BACKUP_EVERY={BACKUP_EVERY}"
    return f"make chaos CYCLES={CYCLES} SEED={SEED}{extra}"


@dataclass
class Cycle:
    n: int
    faults: list[Fault]
    t_fault: float = 0.0
    first_ack: float | None = None
    back: float | None = None
    writer_errors: Counter[str] = field(default_factory=Counter)
    zen_errors: int = 0
    zen_errors_served: int = 0
    unknown_retried: int = 0
    violations: list[str] = field(default_factory=list)
    backup: BackupCheck | None = None
    """The newest-backup check, on the cycles that ran it."""

    @property
    def kind(self) -> str:
        return "+".join(f.kind for f in self.faults)


@pytest.fixture(scope="module")
def places(workdir: Path) -> Iterator[Places]:
    pl = Places([workdir / "pg-chaos" / f"n{i}" for i in range(3)], tmpfs_mb=TMPFS_MB)
    try:
        yield pl
    finally:
        pl.teardown()


@pytest.fixture(scope="module")
def cluster(workdir: Path, places: Places) -> Iterator[PgCluster]:
    """Three servers, each in its own network namespace on its own tmpfs, every one on port 5432
    (as in Kubernetes: a server is known by its host)."""
    c = PgCluster(workdir / "pg-chaos", (5432, 5432, 5432), places=places.setup())
    try:
        c.init()
        yield c
    finally:
        c.destroy()


def _q(node_root: Path, port: int, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    with psycopg.connect(f"host={node_root} port={port} dbname=keyward user=postgres connect_timeout=5",
                         autocommit=True) as c:
        return c.execute(sql, args).fetchall()


def _pct(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{min(xs):.2f} / {statistics.median(xs):.2f} / {max(xs):.2f}"


def _check(cy: Cycle, cluster: PgCluster, load: Load, mon: Monitor, t0: float, zen_spiffe: str,
           key_org: str) -> None:
    v = cy.violations
    ops = list(load.ledger.ops)
    acked = [o for o in ops if o.acked is not None]
    # 1. Every acknowledged write on every server.
    ids = [o.request_id for o in acked]
    for n in cluster.nodes:
        def missing(root: Path = n.root, port: int = n.port) -> set[str]:
            got = {str(r[0]) for r in _q(root, port, "SELECT request_id FROM request_log WHERE request_id = ANY(%s)",
                                         (ids,))}
            return set(ids) - got
        try:
            wait_for(lambda: not missing(), 15, f"every acknowledged write on {n.name}", interval=0.5)
        except AssertionError:
            lost = missing()
            v.append(f"{len(lost)} acknowledged writes missing on {n.name}: "
                     + ", ".join(f"{o.action} {o.org} {o.request_id}" for o in acked if o.request_id in lost)[:600])
    # 2. No acknowledgement while a synchronous standby could not confirm.
    for f in cy.faults:
        for w0, w1 in f.quorum_lost:
            if not f.kind.startswith("cut"):  # a cut standby runs (the monitor sees it) yet cannot confirm
                w1 = min(w1, max(mon.down_until(name, w0, w1) for name in f.target.split(",")))
            bad = [(o, o.acked) for o in acked if o.ack_attempt_started is not None and o.ack_attempt_started > w0 + 0.2
                   and o.acked is not None and o.acked < w1]
            for o, at in bad:
                v.append(f"{o.action} {o.org} (request_id {o.request_id}) acknowledged {at - w0:.2f}s into "
                         f"{f.describe()}, while {f.target} could not confirm it (attempts {o.attempts}, "
                         f"unknown outcome before: {o.unknown})")
    # 3. At most once: audit rows (outcome ok) per org and call against the ledger.
    primary = cluster.primary()
    rows = _q(primary.root, primary.port, "SELECT org_id, action, count(*) FROM audit_events WHERE outcome = 'ok' "
              "AND org_id LIKE 'ch-%%' GROUP BY 1, 2")
    applied = {(str(r[0]), str(r[1])): int(r[2]) for r in rows}  # type: ignore[call-overload]
    expect: dict[tuple[str, str], list[int]] = {}
    for o in ops:
        lo_hi = expect.setdefault((o.org, o.action), [0, 0])
        if o.acked is not None:
            lo_hi[0] += 1
            lo_hi[1] += 1
        elif o.unknown or o.abandoned:
            lo_hi[1] += 1
    for key, (lo, hi) in expect.items():
        got = applied.get(key, 0)
        if not lo <= got <= hi:
            v.append(f"{key[1]} on {key[0]}: {got} applied (audit rows), the ledger allows {lo}..{hi}")
    for key, got in applied.items():
        if key not in expect and key[1] in WRITE_ACTIONS:
            v.append(f"{key[1]} on {key[0]}: {got} applied, never asked")
    by_org: dict[str, list[int]] = {}
    for o in acked:
        if o.action == "UpdatePolicy":
            by_org.setdefault(o.org, []).append(int(o.result.policy_version))
    for org, vers in by_org.items():
        if vers != list(range(2, 2 + len(vers))):
            v.append(f"UpdatePolicy on {org}: acknowledged policy versions {vers} (one applied twice?)")
    # 4. Never two primaries.
    for r in mon.between(t0, time.monotonic()):
        prim = [k for k, x in r.roles.items() if x == "primary"]
        if len(prim) > 1:
            v.append(f"two servers answered as primary in one round at +{r.t - cy.t_fault:.2f}s: {prim}")
            break
    # 5. The audit chain, and a KeySent row for every key a ZEN got.
    env = {k: x for k, x in os.environ.items() if not k.startswith("KEYWARD_")}
    env["KEYWARD_DB_DSN"] = cluster.dsn()
    p = subprocess.run([sys.executable, "-m", "control_plane", "audit", "verify"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    if p.returncode != 0 or "audit chain OK" not in p.stdout:
        v.append(f"keyward audit verify: {p.returncode} {p.stdout.strip()[:300]} {p.stderr.strip()[-300:]}")
    sent = len(load.ledger.reads_ok)

    def key_rows() -> int:
        r = _q(primary.root, primary.port, "SELECT count(*) FROM audit_events WHERE action = 'KeySent' "
               "AND org_id = %s AND actor = %s", (key_org, zen_spiffe))
        count = r[0][0]
        assert isinstance(count, int)
        return count
    try:
        wait_for(lambda: key_rows() >= sent, 30, "a KeySent audit row for every key sent", interval=0.5)
    except AssertionError:
        v.append(f"{sent} keys sent to the ZEN, only {key_rows()} KeySent audit rows")


def _check_backup(cy: Cycle, cluster: PgCluster, logs: Path) -> None:
    """The newest backup restores every live key (tests/chaos/backups.py), with the writers paused:
    a key retired between the reads of the primary and of the restore would be reported."""
    # Beside the servers (a directory the postgres user can reach; pytest's tmp_path is not).
    scratch = cluster.root.parent / f"backup-check-{cy.n}-{uuid.uuid4().hex[:6]}"
    cy.backup = check_newest_backup(cluster.spec_path, scratch, keep_log=logs / f"backup-check-{cy.n}-server.log")
    cy.violations += cy.backup.violations


def test_chaos_campaign(cluster: PgCluster, places: Places, pki_dir: Path, master_secret: tuple[bytes, Path], workdir: Path,
                        tmp_path: Path) -> None:
    print(f"\nchaos: seed {SEED}, {CYCLES} cycles, stalls {STALL[0]:g}-{STALL[1]:g}s, watcher --after {AFTER:g}; "
          f"replay: {replay_command()}", flush=True)
    rng = random.Random(SEED)
    t_start = time.monotonic()
    ca = CA(cluster, pki_dir, master_secret[1], workdir / "ca-chaos", {
        "KEYWARD_CA_LISTEN": f"127.0.0.1:{free_port()}", "KEYWARD_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
        "KEYWARD_AUDIT_SPOOL_FILE": str(workdir / "ca-chaos-spool.jsonl")})
    ca.start()
    watcher = Watcher(cluster, tmp_path / "watch.log", tmp_path / "watch-state.json", AFTER)
    watcher.start()
    platform = clients(ca.addr, pki_dir, "platform-admin")
    platform.admin.RegisterZenPool(pb.RegisterZenPoolRequest(pool=pb.ZenPool(
        name="public", visibility=pb.POOL_VISIBILITY_PUBLIC)), timeout=30)
    from tests.integration.flow import activate, create_org, org_admin
    key_org = f"k-{uuid.uuid4().hex[:8]}"
    create_org(platform, key_org)
    activate(org_admin(ca.addr, pki_dir, key_org), OrgRoot.create(tmp_path, key_org), key_org)
    wait_for(lambda: watcher.state.exists() and json.loads(watcher.state.read_text()).get("last_primary"), 30,
             "the watcher to see the primary")
    mon = Monitor(cluster)
    mon.start()
    load = Load(ca.addr, pki_dir, tmp_path, key_org)
    load.start()
    wait_for(lambda: len(load.ledger.acked()) >= 5, 60, "five acknowledged writes before the first fault")
    zen_spiffe = "spiffe://keyward/zen-pool/public"
    cycles: list[Cycle] = []
    failed: Cycle | None = None
    try:
        for n in range(CYCLES):
            kinds = faults.choose(rng, STALL, only=ONLY)
            cy = Cycle(n, faults.plan(rng, kinds, cluster, STALL))
            lead = rng.uniform(0.3, 1.5)
            cycles.append(cy)
            t0 = time.monotonic()
            time.sleep(lead)  # steady load first
            threads = [threading.Thread(target=faults.run, args=(f, cluster, ca, watcher, places, lambda: None), daemon=True)
                       for f in cy.faults]
            spec = cluster.spec()
            samples: list[tuple[float, bool]] = []  # (when, full redundancy), sampled from the injection on
            sampling = threading.Event()

            def sample(sampling: threading.Event = sampling, spec: Any = spec,
                       samples: list[tuple[float, bool]] = samples) -> None:  # bound: a closure per cycle
                while not sampling.is_set():
                    ok = not status.problems(spec, status.cluster_status(spec))
                    samples.append((time.monotonic(), ok))  # as of its last answer (a stalled server's is late)
                    sampling.wait(0.2)
            sampler = threading.Thread(target=sample, daemon=True)
            for th in threads:
                th.start()
            sampler.start()
            for th in threads:
                th.join(STALL[1] + 120)
            cy.t_fault = min(f.injected for f in cy.faults if f.injected) if any(f.injected for f in cy.faults) else t0
            for f in cy.faults:
                if f.error:
                    cy.violations.append(f"{f.describe()}: the harness could not inject/heal it: {f.error}")

            def back(spec: Any = spec) -> bool:
                if watcher.proc is None or watcher.proc.poll() is not None:
                    return False
                return not status.problems(spec, status.cluster_status(spec))
            try:
                wait_for(back, BACK_TIMEOUT, "three servers streaming, ANY 2 satisfied", interval=0.2)
                sampling.set()
                sampler.join(10)
                # Back: the first full-redundancy sample after the fault was seen (0: never lost, a CA kill).
                lost = [t for t, ok in samples if not ok and t >= cy.t_fault]
                healed = [t for t, ok in samples if ok and lost and t > lost[0]]
                cy.back = (healed[0] if healed else time.monotonic()) - cy.t_fault if lost else 0.0
                wait_for(lambda cy=cy: any(o.ack_attempt_started > cy.t_fault for o in load.ledger.acked()
                                     if o.ack_attempt_started), 60, "a write acknowledged after the fault")
            except AssertionError as e:
                cy.violations.append(f"{e}: {status.render(spec, status.cluster_status(spec))}")
            after = [o.acked for o in load.ledger.acked() if o.ack_attempt_started and o.ack_attempt_started > cy.t_fault]
            cy.first_ack = (min(after) - cy.t_fault) if after else None  # type: ignore[type-var,operator]
            t_end = time.monotonic()
            cy.writer_errors = Counter(e.code for e in list(load.ledger.errors) if cy.t_fault <= e.t <= t_end)
            ca_down = [w for f in cy.faults for w in f.ca_down]
            # A server whose link is down answers the monitor (over its socket), never the CA; nor
            # at once after its link is back (its connections wait out a TCP retransmission).
            cut: dict[str, list[tuple[float, float]]] = {}
            for f in cy.faults:
                if f.kind.startswith("cut-") and f.injected:
                    cut.setdefault(f.target, []).append((f.injected - 0.2, (f.healed or t_end) + 1.0))
            zerr = [e for e in list(load.ledger.reads_failed) if cy.t_fault <= e.t <= t_end]
            cy.zen_errors = len(zerr)
            served = [e for e in zerr if mon.answered_during(e.started, e.t, cut)
                      and not any(e.started <= b + 3 and e.t >= a - 0.5 for a, b in ca_down)]
            cy.zen_errors_served = len(served)
            cy.faults[0].notes += [f"ZEN error while a server answered, +{e.t - cy.t_fault:.1f}s (after "
                                   f"{e.t - e.started:.1f}s): {e.code} {e.detail}" for e in served[:3]]
            if served:
                cy.violations.append(f"{len(served)} ZEN key reads failed while a server answered and the CA ran "
                                     "(ZENs get keys during the fault whenever a server answers)")
            cy.unknown_retried = sum(1 for o in list(load.ledger.ops) if o.unknown and o.acked
                                     and o.acked >= cy.t_fault)
            sampling.set()
            if not cy.violations:
                load.pause()
                try:
                    _check(cy, cluster, load, mon, t0, zen_spiffe, key_org)
                    if not cy.violations and due(n, CYCLES):
                        _check_backup(cy, cluster, tmp_path)
                finally:
                    load.resume()
            print(f"cycle {n}: {' + '.join(f.describe() for f in cy.faults)}: first ack "
                  f"{'-' if cy.first_ack is None else f'{cy.first_ack:.2f}s'}, back "
                  f"{'-' if cy.back is None else f'{cy.back:.1f}s'}, writer errors {dict(cy.writer_errors)}, "
                  f"ZEN errors {cy.zen_errors} ({cy.zen_errors_served} while a server answered), "
                  f"unknown-then-acked {cy.unknown_retried}"
                  + (f"\n  {cy.backup.summary()}" if cy.backup else "")
                  + "".join(f"\n  VIOLATION: {x}" for x in cy.violations)
                  + "".join(f"\n  note: {x}" for f in cy.faults for x in f.notes), flush=True)
            if cy.violations:
                failed = cy
                break
    finally:
        load.close()
        mon.stop.set()
        watcher.stop()
        ca.stop()
        if failed is not None:  # the servers' logs outlive the cluster (pytest keeps tmp_path)
            for nd in cluster.nodes:
                if nd.logfile.exists():
                    (tmp_path / f"{nd.name}-server.log").write_bytes(nd.logfile.read_bytes())
            print(f"logs: {tmp_path}", flush=True)
        table = report(cycles, load, time.monotonic() - t_start)
        print(table, flush=True)
        out = os.environ.get("KEYWARD_CHAOS_REPORT")
        if out:
            Path(out).write_text(table + "\n")
    assert failed is None, (f"cycle {failed.n} ({failed.kind}): " + "; ".join(failed.violations)
                            + f"\nseed {SEED}; replay: {replay_command()}")


def _spread(xs: list[int]) -> tuple[int, int, int]:
    return min(xs), int(statistics.median_low(xs)), max(xs)


def _backup_line(cycles: list[Cycle]) -> str:
    checks = [c.backup for c in cycles if c.backup is not None]
    if not checks:
        return "Newest backup: not checked (KEYWARD_CHAOS_BACKUP_EVERY)."
    return (f"Newest backup: checked {len(checks)} times (every {BACKUP_EVERY} cycles and the last), "
            f"{sum(bool(c.violations) for c in checks)} failed; live keys restored "
            f"{' / '.join(str(k) for k in _spread([c.restored_keys for c in checks]))}, "
            f"seconds per check {_pct([c.seconds for c in checks])} "
            f"(reconcile {_pct([c.reconcile_seconds for c in checks])}, restore + compare "
            f"{_pct([c.restore_seconds for c in checks])}) (min / med / max); "
            f"{sum(any(a.startswith('took') for a in c.actions) for c in checks)} new backups taken by reconcile.")


def report(cycles: list[Cycle], load: Load, seconds: float) -> str:
    ops = list(load.ledger.ops)
    lines = [f"## Chaos campaign: seed {SEED}, {len(cycles)} cycles, {seconds / 60:.1f} min "
             f"(stalls {STALL[0]:g}-{STALL[1]:g}s, watcher --after {AFTER:g}s)", "",
             f"Writes: {sum(o.acked is not None for o in ops)} acknowledged, "
             f"{sum(bool(o.unknown) and o.acked is not None for o in ops)} of them after an unknown outcome "
             f"(retried with their request_id), {sum(bool(o.refused) for o in ops)} refused, "
             f"{sum(o.abandoned for o in ops)} abandoned; ZEN reads: {len(load.ledger.reads_ok)} ok, "
             f"{len(load.ledger.reads_failed)} failed.", "", _backup_line(cycles), "",
             "| fault | cycles | fault → first ack, s (min / med / max) | back to 3 streaming + ANY 2, s "
             "(min / med / max) | writer errors (codes) | ZEN errors (while a server answered) | violations |",
             "|---|---|---|---|---|---|---|"]
    kinds: dict[str, list[Cycle]] = {}
    for c in cycles:
        kinds.setdefault(c.kind, []).append(c)
    for k, cs in sorted(kinds.items()):
        codes: Counter[str] = Counter()
        for c in cs:
            codes.update(c.writer_errors)
        lines.append(f"| {k} | {len(cs)} | {_pct([c.first_ack for c in cs if c.first_ack is not None])} | "
                     f"{_pct([c.back for c in cs if c.back is not None])} | "
                     f"{sum(codes.values())} ({', '.join(f'{x} {y}' for x, y in codes.most_common())}) | "
                     f"{sum(c.zen_errors for c in cs)} ({sum(c.zen_errors_served for c in cs)}) | "
                     f"{sum(len(c.violations) for c in cs)} |")
    return "\n".join(lines)
