"""``make demo``: the whole key-custody flow against the local stack.

Starts the stack (Postgres + CA), then, printing each step:
an org admin gets a CSR from the CA, signs it with openssl as the org's own
root CA would, uploads it; a public ZEN fetches the key (encrypted) and opens
it in locked memory with the data plane's key library; a private-only org's
key is refused to the public pool and given to its private pool; a rotation
hard-deletes the old key; the audit chain verifies.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from devstack import pki, stack
from keylib import proxyauth

RUN = stack.RUN
DEMO = RUN / "demo"
PKI = RUN / "pki"
EXT = "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\n"


def step(title: str) -> None:
    print(f"\n== {title}")


def call(who: str, method: str, body: dict[str, Any], *, expect_ok: bool = True) -> dict[str, Any]:
    short = method.split(".")[-1]
    print(f"$ grpcurl -cacert ca.crt -cert {who}.crt -key {who}.key -d '{json.dumps(body)[:90]}' "
          f"{stack.CA_ADDR} {short}")
    r = stack.grpcurl(PKI, who, method, json.dumps(body))
    if expect_ok and r.returncode != 0:
        raise SystemExit(f"demo failed at {short}: {r.stderr.strip()}")
    if not expect_ok:
        if r.returncode == 0:
            raise SystemExit(f"demo expected {short} to be refused, and it was not")
        print("  refused: " + " ".join(r.stderr.split())[:200])
        return {}
    return dict(json.loads(r.stdout or "{}"))


def org_root(org: str) -> Path:
    d = DEMO / f"{org}-root"
    if not (d / "root.crt").exists():
        d.mkdir(parents=True, exist_ok=True)
        print(f"$ openssl req -x509 -newkey ec ... -subj '/CN={org} root CA'   (the org's own root, kept by the org)")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-keyout", str(d / "root.key"), "-out", str(d / "root.crt"), "-days", "3650",
                        "-subj", f"/CN={org} root CA", "-addext", "basicConstraints=critical,CA:TRUE",
                        "-addext", "keyUsage=critical,keyCertSign,cRLSign"], check=True, capture_output=True)
    return d


def activate(org: str, who: str) -> str:
    csr = call(who, "keyward.v1.Admin/RequestIntermediateCsr", {"org_id": org})
    print(f"  CA generated {csr['algorithm']} key {csr['key_id']} and sealed it at once; CSR returned")
    root = org_root(org)
    (DEMO / f"{org}.csr").write_text(csr["csr_pem"])
    (DEMO / "ext.cnf").write_text(EXT)
    print(f"$ openssl x509 -req -in {org}.csr -CA {org}-root/root.crt -CAkey {org}-root/root.key "
          "-extfile ext.cnf (CA:TRUE, pathlen:0, keyCertSign)")
    subprocess.run(["openssl", "x509", "-req", "-in", str(DEMO / f"{org}.csr"), "-CA", str(root / "root.crt"),
                    "-CAkey", str(root / "root.key"), "-CAcreateserial", "-out", str(DEMO / f"{org}.crt"),
                    "-days", "365", "-sha256", "-extfile", str(DEMO / "ext.cnf")], check=True, capture_output=True)
    up = call(who, "keyward.v1.Admin/UploadIntermediateCertificate",
              {"org_id": org, "certificate_pem": (DEMO / f"{org}.crt").read_text(),
               "chain_pem": (root / "root.crt").read_text()})
    print(f"  active: key {up['key_id']} version {up['version']} serial {up['serial_hex']}")
    return str(csr["key_id"])


ACME, BANK = "demo-acme", "demo-bank"
"""The demo's own organizations: never the names the README's tutorial uses (acme, bank), so a
tutorial after the demo starts from nothing, and the demo never rotates a user's key."""
MARK = " (keyward demo)"
"""Ends the display name of every org the demo creates: a re-run touches only those."""

PROXY_SECRET = "acme-demo-proxy-credential"
"""demo-acme's users authenticate to a ZEN as demo-acme:PROXY_SECRET; the policy holds only its
verifier (``keyward proxy-verifier`` makes both for real orgs)."""


def acme_policy() -> dict[str, Any]:
    return {"fail_mode": "FAIL_MODE_OPEN", "blocked_hosts": ["gambling.example"],
            "do_not_inspect_hosts": ["bank.example"],
            "proxy_credential_verifiers": [proxyauth.make(PROXY_SECRET)]}


def ensure_org(org: str, policy: dict[str, Any]) -> None:
    if not (PKI / f"org-admin-{org}.crt").exists():
        pki.org_admin(PKI, org)
        print(f"  issued dev identity org-admin-{org}.crt (spiffe://keyward/org-admin/{org})")
    r = stack.grpcurl(PKI, "platform-admin", "keyward.v1.Admin/GetOrganization", json.dumps({"org_id": org}))
    if r.returncode == 0:
        if not json.loads(r.stdout).get("display_name", "").endswith(MARK):
            raise SystemExit(f"organization {org!r} exists and was not made by the demo: the demo leaves it alone. "
                             "Run the demo on a fresh stack (make down; rm -rf .run) or rename that org.")
        print(f"  organization {org!r} exists already (made by an earlier demo run): its key will be rotated")
        return
    call("platform-admin", "keyward.v1.Admin/CreateOrganization",
         {"org_id": org, "display_name": org.split("-")[-1].capitalize() + " Corp" + MARK, "policy": policy})


def bind_private(pool: str, org: str) -> None:
    """Add ``org`` to the private pool, keeping every org already bound to it (RegisterZenPool
    replaces the list: the demo must not unbind a user's org)."""
    pools = call("platform-admin", "keyward.v1.Admin/ListZenPools", {}).get("pools", [])
    bound = next((list(p.get("org_ids", [])) for p in pools if p.get("name") == pool), [])
    if org in bound:
        return
    call("platform-admin", "keyward.v1.Admin/RegisterZenPool",
         {"pool": {"name": pool, "visibility": "POOL_VISIBILITY_PRIVATE", "org_ids": sorted({*bound, org})}})


def open_as_zen(kp: dict[str, Any]) -> None:
    # The ZEN side: the data plane's key library, never the CA's.
    from data_plane.keyopen import open_org_key
    from keylib.master import MasterSecret

    master = MasterSecret.load(path=str(stack.secret_dir() / "master.key"))
    try:
        buf = open_org_key(master, org_id=kp["org_id"], key_id=kp["key_id"], keylib_format=kp["keylib_format"],
                           sealed=base64.b64decode(kp["encrypted_private_key"]),
                           certificate_pem=kp["certificate_pem"])
        try:
            key = serialization.load_der_private_key(buf.view, None)
            cert = x509.load_pem_x509_certificate(kp["certificate_pem"].encode())
            f = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            same = key.public_key().public_bytes(*f) == cert.public_key().public_bytes(*f)
            print(f"  opened in locked memory ({buf.size} bytes, mlock'd, MADV_DONTDUMP); "
                  f"matches the intermediate's public key: {'yes' if same else 'NO'}")
            if not same:
                raise SystemExit("opened key does not match the certificate")
        finally:
            buf.wipe()
            print("  plaintext buffer zeroed and unmapped")
    finally:
        master.wipe()


def zen_demo() -> None:
    """A local HTTPS origin (shop.test), a ZEN in front of it, curl and openssl through it."""
    import http.server
    import ssl
    import threading

    web = DEMO / "web"
    web.mkdir(parents=True, exist_ok=True)
    ca, ca_key = pki.build_cert(subject_cn="demo web root", issuer=None, issuer_key=None, is_ca=True)
    pki.write_identity(web, "root", ca, ca_key)
    site, site_key = pki.build_cert(subject_cn="shop.test", issuer=ca, issuer_key=ca_key, server=True,
                                    dns=["shop.test"])
    pki.write_identity(web, "site", site, site_key)

    class Hello(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802
            body = b"hello from shop.test\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    origin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    octx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    octx.load_cert_chain(web / "site.crt", web / "site.key")
    origin.socket = octx.wrap_socket(origin.socket, server_side=True)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    oport = origin.server_address[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARD_ZEN")}
    env.update(KEYWARD_ZEN_LISTEN="127.0.0.1:0", KEYWARD_ZEN_METRICS_LISTEN="", KEYWARD_CA_ADDR=stack.CA_ADDR,
               KEYWARD_ZEN_TLS_CERT_FILE=str(PKI / "zen-public.crt"), KEYWARD_ZEN_TLS_KEY_FILE=str(PKI / "zen-public.key"),
               KEYWARD_ZEN_CA_TRUST_FILE=str(PKI / "ca.crt"),
               KEYWARD_MASTER_SECRET_FILE=str(stack.secret_dir() / "master.key"),
               KEYWARD_ZEN_EXTRA_ROOTS_FILE=str(web / "root.crt"), KEYWARD_ZEN_RESOLVE="shop.test=127.0.0.1")
    log = RUN / "logs" / "zen-demo.log"
    with open(log, "wb") as out:
        zen = subprocess.Popen([sys.executable, "-m", "data_plane"], env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 30
        zport = 0
        while not zport:
            if zen.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"ZEN did not start; see {log}")
            for line in log.read_text().splitlines():
                if line.startswith("{") and '"ZEN listening"' in line:
                    zport = int(json.loads(line)["port"])
            time.sleep(0.1)
        print(f"  ZEN (pool 'public') listening on 127.0.0.1:{zport}; origin shop.test on port {oport}")
        cmd = ["curl", "-sS", "--max-time", "20", "--proxy", f"http://127.0.0.1:{zport}", "--proxy-user", f"{ACME}:{PROXY_SECRET}",
               "--cacert", str(DEMO / f"{ACME}-root" / "root.crt"), f"https://shop.test:{oport}/"]
        print(f"$ curl --proxy http://127.0.0.1:{zport} --proxy-user {ACME}:{PROXY_SECRET} --cacert {ACME}-root/root.crt "
              f"https://shop.test:{oport}/")
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        print("  " + (r.stdout.strip() or r.stderr.strip()))
        if r.returncode != 0:
            raise SystemExit("curl through the ZEN failed")
        o = subprocess.run(["openssl", "s_client", "-proxy", f"127.0.0.1:{zport}", "-proxy_user", ACME,
                            "-proxy_pass", f"pass:{PROXY_SECRET}", "-connect", f"shop.test:{oport}", "-servername", "shop.test"],
                           input="", capture_output=True, text=True, timeout=30)
        chain = [ln.strip() for ln in o.stdout.splitlines() if ln.strip()[:2] in ("0 ", "1 ") or
                 ln.strip().startswith(("s:", "i:"))]
        print(f"$ openssl s_client -proxy 127.0.0.1:{zport} -proxy_user {ACME} -proxy_pass pass:{PROXY_SECRET} -connect shop.test:{oport}")
        for ln in chain[:4]:
            print(f"  {ln}")
        kids = subprocess.run(["pgrep", "-P", str(zen.pid)], capture_output=True, text=True).stdout.split()
        print(f"  {ACME}'s key lives only in signer process(es) {', '.join(kids) or '-'} (mlock'd, not dumpable); "
              f"the ZEN process {zen.pid} holds no copy of it")
    finally:
        zen.terminate()
        zen.wait(15)
        origin.shutdown()


def main() -> None:
    step("1. Start the local stack (Postgres + Central Authority, mTLS on every call)")
    stack.up()
    DEMO.mkdir(parents=True, exist_ok=True)
    pg = stack.cluster()

    step(f"2. Platform admin creates organization '{ACME}'")
    ensure_org(ACME, acme_policy())

    step("3. Org admin asks for a CSR; signs it with the org's root (openssl); uploads the intermediate")
    old_rows = pg.psql(f"SELECT key_id FROM intermediate_keys WHERE org_id = '{ACME}' AND state = 'active'")
    key_id = activate(ACME, f"org-admin-{ACME}")

    step(f"4. A public ZEN fetches {ACME}'s key: it arrives ENCRYPTED, with the intermediate and chain")
    kp = call("zen-public", "keyward.v1.KeyDistribution/GetKeyPair", {"org_id": ACME})
    print(f"  key {kp['key_id']} v{kp['version']}: {len(kp['encrypted_private_key'])} base64 chars of AES-256-GCM "
          f"ciphertext ({kp['keylib_format']}); not after {kp['not_after']}")
    assert kp["key_id"] == key_id

    step("5. The ZEN opens it in its own memory with the data plane's key library (the CA never can)")
    open_as_zen(kp)

    step("6. A private-only org: its key goes to its private pool, never to a public one")
    ensure_org(BANK, {"private_zen_only": True, "fail_mode": "FAIL_MODE_CLOSED"})
    bind_private("private", BANK)
    activate(BANK, f"org-admin-{BANK}")
    call("zen-public", "keyward.v1.KeyDistribution/GetKeyPair", {"org_id": BANK}, expect_ok=False)
    priv = call("zen-private", "keyward.v1.KeyDistribution/GetKeyPair", {"org_id": BANK})
    print(f"  private pool got {BANK}'s key {priv['key_id']} (encrypted)")

    step(f"7. Rotation: a new intermediate replaces {ACME}'s key; the old one is deleted from the database")
    new_id = activate(ACME, f"org-admin-{ACME}")
    rows = pg.psql(f"SELECT key_id || ' ' || state FROM intermediate_keys WHERE org_id = '{ACME}'")
    print(f"  intermediate_keys rows for {ACME} now: {rows.splitlines()}")
    assert key_id not in rows and new_id in rows and len(rows.splitlines()) == 1
    listed = call(f"org-admin-{ACME}", "keyward.v1.Admin/ListIntermediates", {"org_id": ACME})
    for i in listed.get("intermediates", [])[:3]:
        print(f"  {i['key_id']}  {i['state']}")
    if old_rows:
        print(f"  (key from a previous demo run, {old_rows.split()[0]}, was rotated out too)")

    step("8. Audit: every action and every key sent, hash-chained")
    ev = call("platform-admin", "keyward.v1.Admin/ListAuditEvents", {"limit": 1000}).get("events", [])
    for e in ev[-5:]:
        print(f"  #{e['seq']} {e['actor']} {e['action']} org={e.get('org_id', '')} outcome={e['outcome']}")
    env = dict(os.environ, KEYWARD_DB_DSN=pg.dsn())
    r = subprocess.run([sys.executable, "-m", "control_plane", "audit", "verify"], env=env, capture_output=True,
                       text=True, check=False)
    print(f"$ keyward audit verify\n  {r.stdout.strip()}")
    if r.returncode != 0:
        raise SystemExit("audit verification failed")

    step("9. Three Postgres servers: every acknowledged write is on all three")
    r = subprocess.run([sys.executable, "-m", "control_plane", "db", "--cluster", str(pg.spec_path), "status"],
                       capture_output=True, text=True, check=False)
    print("$ keyward db status\n" + "\n".join("  " + ln for ln in r.stdout.splitlines()))

    step("10. Backups forget retired keys: the backup agent re-backs up and shreds stale backups")
    from dbops import backup as dbbackup

    spec = pg.spec()
    retired = base64.b64decode(kp["encrypted_private_key"])  # the key from step 4, rotated out in step 7
    active = base64.b64decode(call("zen-public", "keyward.v1.KeyDistribution/GetKeyPair",
                                   {"org_id": ACME})["encrypted_private_key"])
    deadline = time.monotonic() + 120
    while True:
        bs = dbbackup.list_backups(spec)
        files = [f for b in bs for f in b.path.rglob("*") if f.is_file()]
        if bs and new_id in bs[-1].key_ids and not any(retired[:64] in f.read_bytes() for f in files):
            break
        if time.monotonic() > deadline:
            raise SystemExit("backup agent did not produce a clean backup in 120 s; see .run/logs/backup-agent.log")
        time.sleep(0.5)
    newest = bs[-1].path
    print(f"  {len(bs)} backup(s) kept; newest {newest.name}")
    print(f"  retired key's ciphertext found in {sum(retired[:64] in f.read_bytes() for f in files)} of "
          f"{len(files)} backup files; active key's ciphertext in the newest: "
          f"{'yes' if any(active[:64] in f.read_bytes() for f in newest.rglob('*') if f.is_file()) else 'NO'}")

    step("11. Failover: SIGKILL the primary; keys keep flowing from a standby; the watcher promotes, no write lost")
    from dbops import local

    prim = pg.primary()
    print(f"$ kill -9 <all processes of {prim.name}>   (the primary)")
    t0 = time.monotonic()
    local.kill_node(spec.node(prim.name))
    kp2 = call("zen-public", "keyward.v1.KeyDistribution/GetKeyPair", {"org_id": ACME})
    print(f"  ZEN still got {ACME}'s key {kp2['key_id']} while no primary runs (read from a standby)")
    print("  keyward db watch (started by make up) fails over once no primary has answered for 3 s:")
    watch_log = RUN / "logs" / "db-watch.log"
    deadline = time.monotonic() + 90
    while True:
        done = [json.loads(ln) for ln in watch_log.read_text().splitlines()
                if '"failed over"' in ln and f'"old_primary": "{prim.name}"' in ln] if watch_log.exists() else []
        if done:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"the watcher did not fail over in 90 s; see {watch_log}")
        time.sleep(0.2)  # poll interval of a bounded wait (another process's log)
    for s_ in done[-1]["steps"]:
        print(f"  {s_}")
    call(f"org-admin-{ACME}", "keyward.v1.Admin/UpdatePolicy", {"org_id": ACME, "policy": acme_policy()})
    print(f"  first write acknowledged by the new primary {done[-1]['new_primary']} "
          f"{time.monotonic() - t0:.1f}s after the kill")

    step(f"12. A ZEN intercepts {ACME}'s HTTPS traffic with a leaf minted from {ACME}'s intermediate")
    zen_demo()

    print("\nDemo complete. The stack keeps running: `source .run/env`, then the README's tutorial from its step 2 "
          "(keyward org create acme ...) does all this by hand; `make down` stops it.")


if __name__ == "__main__":
    main()
