"""``keyward``: the CA's command line.

    keyward serve          run the Central Authority (configuration: env, see config.py)
    keyward audit verify   check the audit log's hash chain (KEYWARD_DB_DSN)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from control_plane import config, logs
from control_plane.errors import KeywardError


def _serve() -> int:
    from control_plane import server
    from control_plane.hardening import no_core_dumps
    from keylib.errors import KeylibError
    from keylib.master import MasterSecret

    try:
        cfg = config.from_env()
        logs.setup(cfg.log_level)
        if cfg.extra:
            logging.getLogger("keyward.ca").warning(
                "ignoring unknown settings (typo?): %s", ", ".join(sorted(cfg.extra)))
        no_core_dumps()
        master = MasterSecret.load(path=cfg.master_secret_file or None, require_lock=cfg.require_mlock)
        asyncio.run(server.serve(cfg, master))
    except (KeywardError, KeylibError) as e:
        print(f"keyward: {e}", file=sys.stderr)
        return 2
    return 0


def _audit_verify() -> int:
    from control_plane.store import Store

    dsn = os.environ.get("KEYWARD_DB_DSN")
    if not dsn:
        print("keyward: set KEYWARD_DB_DSN", file=sys.stderr)
        return 2

    async def run() -> int:
        store = await Store.open(dsn, max_size=1)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="keyward", description="keyward Central Authority")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve", help="run the Central Authority")
    audit = sub.add_parser("audit", help="audit log tools")
    audit_sub = audit.add_subparsers(dest="audit_cmd", required=True)
    audit_sub.add_parser("verify", help="verify the audit log's hash chain")
    a = ap.parse_args(argv)
    if a.cmd == "serve":
        return _serve()
    return _audit_verify()


if __name__ == "__main__":
    sys.exit(main())
