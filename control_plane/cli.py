"""``keyward``: the CA's command line.

    keyward serve          run the Central Authority (configuration: env, see config.py)
    keyward audit verify   check the audit log's hash chain (KEYWARD_DB_DSN)
    keyward db status|failover|rejoin|backup|restore|backup-agent
                           Postgres cluster operations (KEYWARD_DB_CLUSTER)
    keyward org|key|pool|health|dev|completion, keyward audit list
                           the admin commands, a client of the API (control_plane.adminctl, docs/cli.md)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import sys
from pathlib import Path

from common import loops
from common.hardening import no_core_dumps
from control_plane import config, logs
from control_plane.errors import KeywardError
from keylib import proxyauth


def _serve() -> int:
    logs.setup()  # first: every line JSON, configuration errors included; and before grpc is imported
    from control_plane import server
    from keylib.errors import KeylibError
    from keylib.master import MasterSecret

    log = logging.getLogger("keyward.ca")
    try:
        cfg = config.from_env()
        logging.getLogger().setLevel(cfg.log_level)
        if cfg.extra:
            log.warning("ignoring unknown settings (typo?): %s", ", ".join(sorted(cfg.extra)))
        no_core_dumps()
        master = MasterSecret.load(path=cfg.master_secret_file or None, require_lock=cfg.require_mlock)
        loops.run(server.serve(cfg, master), cfg.event_loop)
    except (KeywardError, KeylibError) as e:
        log.error("%s", e)  # one line, no traceback: the message names the setting
        return 2
    return 0


def _audit_verify() -> int:
    from control_plane.store import Store

    dsn = os.environ.get("KEYWARD_DB_DSN")
    if not dsn:
        print("keyward: set KEYWARD_DB_DSN", file=sys.stderr)
        return 2

    pw_file = os.environ.get("KEYWARD_DB_PASSWORD_FILE", "")
    try:
        password = Path(pw_file).read_text().rstrip("\r\n") if pw_file else None
    except OSError as e:
        print(f"keyward: cannot read KEYWARD_DB_PASSWORD_FILE {pw_file!r}: {e.strerror}", file=sys.stderr)
        return 2

    async def run() -> int:
        store = await Store.open(dsn, max_size=1, password=password)
        try:
            v = await store.verify_audit()
        finally:
            await store.close()
        if v.ok:
            print(f"audit chain OK: {v.rows} events, head {v.head_hex}")
            return 0
        print(f"audit chain BROKEN at event {v.rows}: {v.problem}")
        return 1

    try:
        return asyncio.run(run())
    except KeywardError as e:
        print(f"keyward: {e}", file=sys.stderr)
        return 2


def _db(a: argparse.Namespace) -> int:
    from dbops import backup, failover, local, status
    from dbops.binaries import PgError
    from dbops.spec import ClusterSpec

    path = a.cluster or os.environ.get("KEYWARD_DB_CLUSTER")
    if not path:
        print("keyward: give --cluster FILE or set KEYWARD_DB_CLUSTER (written by `make up` as .run/pg/cluster.json)",
              file=sys.stderr)
        return 2
    try:
        spec = ClusterSpec.load(path)
    except (OSError, ValueError, TypeError, KeyError) as e:
        print(f"keyward: cannot read cluster spec {path!r}: {e}", file=sys.stderr)
        return 2
    try:
        if a.db_cmd == "status":
            sts = status.cluster_status(spec)
            print(status.render(spec, sts))
            return 1 if status.problems(spec, sts) else 0
        if a.db_cmd == "failover":
            rep = failover.failover(spec, force_fence=a.fence, rejoin=not a.no_rejoin)
            for step in rep.steps:
                print(f"  {step}")
            print(f"failover done in {rep.seconds:.2f}s: {rep.old_primary} -> {rep.new_primary}")
            return 0
        if a.db_cmd == "rejoin":
            node = spec.node(a.node)
            prim = backup.primary_node(spec)
            print(f"{node.name} rejoined {prim.name} ({local.rejoin(spec, node, prim)})")
            return 0
        if a.db_cmd == "backup":
            b = backup.backup(spec)
            print(f"backup {b.path} ({len(b.key_ids)} keys)")
            for line in backup.reconcile(spec):
                print(f"  {line}")
            return 0
        if a.db_cmd == "restore":
            from pathlib import Path

            node = backup.restore(Path(a.backup), Path(a.dir), a.port)
            print(f"restored {a.backup} into {a.dir}: a fresh primary on {node.host}:{node.port}")
            return 0
        if a.db_cmd == "watch":
            from pathlib import Path

            from common.logs import setup
            from dbops import watch

            setup("INFO", "keyward-db-watch")
            state = Path(a.state) if a.state else Path(path).parent / "watch-state.json"
            watch.agent(spec, state=state, after=a.after)
            return 0
        if a.db_cmd == "backup-agent":
            from common.logs import setup

            setup("INFO", "keyward-backup-agent")  # a daemon: JSON lines like every keyward process
            backup.agent(spec, interval=a.interval)
            return 0
    except failover.FailoverRefused as e:
        print(f"keyward: failover refused: {e}", file=sys.stderr)
        return 3
    except (PgError, OSError) as e:
        print(f"keyward: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # psycopg errors: one line, no traceback
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"keyward: database error: {first}", file=sys.stderr)
        return 2
    return 2


def _proxy_verifier(from_stdin: bool) -> int:
    """Print a verifier for policy.proxy_credential_verifiers; the secret itself goes only to
    the org's users (their proxy password), never to the CA."""
    if from_stdin:
        secret = sys.stdin.readline().rstrip("\r\n")
    else:
        secret = secrets.token_urlsafe(24)
        print(f"secret:   {secret}    (give it to your users as the proxy password; it is shown once)",
              file=sys.stderr)
    try:
        print(proxyauth.make(secret))
    except proxyauth.VerifierError as e:
        print(f"keyward: {e}", file=sys.stderr)
        return 2
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("keyward")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    words = [w for w in argv if not w.startswith("-")]
    if words[:1] and words[0] in ("org", "key", "pool", "health", "dev", "completion", "audit"):
        # Before grpc is imported: its core would print its own log lines around our one-line errors.
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    if argv == ["serve"]:
        # Before anything imports grpc (the admin commands do): the CA turns gRPC's handshake
        # trace on at start, which only takes effect if grpc is not loaded yet.
        return _serve()
    from control_plane import adminctl

    ap = argparse.ArgumentParser(prog="keyward", description="keyward: the Central Authority and its admin "
                                 "command line", epilog=adminctl.EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"keyward {_version()}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    sub.add_parser("serve", help="run the Central Authority")
    audit = sub.add_parser("audit", help="audit log: list events (API), verify the hash chain (database)")
    audit_sub = audit.add_subparsers(dest="audit_cmd", required=True, metavar="COMMAND")
    audit_sub.add_parser("verify", help="verify the audit log's hash chain (reads KEYWARD_DB_DSN, "
                                        "KEYWARD_DB_PASSWORD_FILE)")
    db = sub.add_parser("db", help="Postgres cluster operations")
    db.add_argument("--cluster", help="cluster spec JSON (default: $KEYWARD_DB_CLUSTER)")
    db_sub = db.add_subparsers(dest="db_cmd", required=True)
    db_sub.add_parser("status", help="role, lag and sync state of each server; exit 1 on problems")
    fo = db_sub.add_parser("failover", help="promote the most advanced standby when the primary is lost")
    fo.add_argument("--fence", action="store_true", help="fence a primary that still answers, then fail over")
    fo.add_argument("--no-rejoin", action="store_true", help="leave the old primary fenced and stopped")
    rj = db_sub.add_parser("rejoin", help="bring a node back as a standby (pg_rewind or clone)")
    rj.add_argument("node")
    db_sub.add_parser("backup", help="take a backup, then shred backups holding retired keys")
    rs = db_sub.add_parser("restore", help="restore a backup into a fresh server")
    rs.add_argument("backup")
    rs.add_argument("dir")
    rs.add_argument("port", type=int)
    ag = db_sub.add_parser("backup-agent", help="keep backups clean: re-backup and shred after each retirement")
    ag.add_argument("--interval", type=float, default=1.0)
    wa = db_sub.add_parser("watch", help="fail over by itself when the primary is lost (the operator's decisions, "
                                         "outside Kubernetes; one watcher per cluster)")
    wa.add_argument("--after", type=float, default=3.0,
                    help="seconds without any primary before failing over (default 3)")
    wa.add_argument("--state", help="file keeping the last primary seen (default: beside the cluster spec)")
    pv = sub.add_parser("proxy-verifier", help="make a proxy credential and the verifier for an org's policy")
    pv.add_argument("--stdin", action="store_true",
                    help="read the secret from stdin (default: make a random one and print it once)")
    adminctl.register(ap, sub, audit_sub)
    a = ap.parse_args(argv)
    if getattr(a, "run", None) is not None:
        return adminctl.run(a)
    if a.cmd == "proxy-verifier":
        return _proxy_verifier(a.stdin)
    if a.cmd == "serve":
        return _serve()
    if a.cmd == "db":
        return _db(a)
    return _audit_verify()


if __name__ == "__main__":
    sys.exit(main())
