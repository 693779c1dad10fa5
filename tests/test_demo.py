"""`make demo`'s program, end to end, in its own run folder and ports, then
`make down`'s: what a user sees on a fresh machine."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from devstack.pg import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_end_to_end_and_stops() -> None:
    run = Path(tempfile.mkdtemp(prefix="keyward-demo-"))
    os.chmod(run, 0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARD_")}
    env.update(KEYWARD_RUN_DIR=str(run), KEYWARD_PG_PORT=str(free_port()),
               KEYWARD_CA_ADDR=f"127.0.0.1:{free_port()}", KEYWARD_METRICS_ADDR=f"127.0.0.1:{free_port()}")
    try:
        r = subprocess.run([sys.executable, "-m", "devstack.demo"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
        out = r.stdout
        logs = "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in (run / "logs").glob("*.log"))
        assert r.returncode == 0, out[-3000:] + r.stderr[-3000:] + logs
        assert "matches the intermediate's public key: yes" in out
        assert "refused: ERROR: Code: PermissionDenied" in out
        assert "private pool got demo-bank's key" in out
        assert "INTERMEDIATE_STATE_ROTATED" in out
        assert "audit chain OK" in out and "Demo complete" in out
        assert "retired key's ciphertext found in 0 of" in out and "rejoined" in out
        assert "hello from shop.test" in out and "i:CN = demo-acme keyward intermediate" in out
        envfile = (run / "env").read_text()
        for var in ("KEYWARD_CA_ADDR", "KEYWARD_DB_DSN", "KEYWARD_PKI_DIR"):
            assert var in envfile
        # Sourced, the variables reach child programs (they were once set but not exported).
        seen = subprocess.run(["bash", "-c", f". '{run}/env' && env"], capture_output=True, text=True,
                              timeout=30, env={"PATH": os.environ.get("PATH", "")}).stdout
        assert f"KEYWARD_DB_CLUSTER={run}" in seen and "KEYWARD_CA_ADDR=" in seen, seen
        for f in ("ca.crt", "platform-admin.crt", "platform-admin.key", "org-admin-demo-acme.crt", "zen-public.key",
                  "zen-private.crt"):
            assert (run / "pki" / f).exists(), f
        # A re-run touches only the demo's own orgs: one it did not make, even under one of its names,
        # is left alone (the demo stops and says why), and binding its private org keeps the user's.
        user_org = "user-" + os.urandom(3).hex()
        code = f"""
import json
from devstack import demo, stack
r = stack.grpcurl(demo.PKI, "platform-admin", "keyward.v1.Admin/CreateOrganization",
                  json.dumps({{"org_id": "{user_org}", "display_name": "theirs", "policy": {{"private_zen_only": True}}}}))
assert r.returncode == 0, r.stderr
pools = demo.call("platform-admin", "keyward.v1.Admin/ListZenPools", {{}})["pools"]
bound = next(p["org_ids"] for p in pools if p["name"] == "private")
demo.call("platform-admin", "keyward.v1.Admin/RegisterZenPool", {{"pool": {{"name": "private",
          "visibility": "POOL_VISIBILITY_PRIVATE", "org_ids": bound + ["{user_org}"]}}}})
demo.bind_private("private", demo.BANK)
pools = demo.call("platform-admin", "keyward.v1.Admin/ListZenPools", {{}})["pools"]
assert "{user_org}" in next(p["org_ids"] for p in pools if p["name"] == "private"), pools
demo.ensure_org("{user_org}", {{}})
"""
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and "was not made by the demo: the demo leaves it alone" in r.stderr, r.stderr[-2000:]
    finally:
        d = subprocess.run([sys.executable, "-m", "devstack.stack", "down"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        subprocess.run(["rm", "-rf", str(run)], check=False)
    assert d.returncode == 0 and "stack stopped" in d.stdout
