"""The admin command line (``keyward org|key|pool|audit list|health|dev|completion``), run as the
real ``keyward`` entry point in a subprocess against the real CA over mTLS (session fixtures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from devstack import pki
from devstack.pg import PgCluster, free_port
from tests.helpers import ROOT, CAProcess, Clients, start_ca, wait_for

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def kw(ca: CAProcess, pki_dir: Path, tmp_path: Path) -> Run:
    """``keyward ARGS`` (this checkout's code) in tmp_path, with the CA's address and the PKI dir in
    the environment and ``identity`` as KEYWARD_IDENTITY."""

    def run(*args: str, identity: str | None = None, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        e = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARD_")}
        e.update(PYTHONPATH=str(ROOT), KEYWARD_CA_ADDR=ca.addr, KEYWARD_PKI_DIR=str(pki_dir))
        if identity:
            e["KEYWARD_IDENTITY"] = identity
        e.update(env or {})
        return subprocess.run([sys.executable, "-m", "control_plane.cli", *args], env=e, cwd=cwd or tmp_path,
                              capture_output=True, text=True, timeout=90)

    return run


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r.stdout


def one_line_error(r: subprocess.CompletedProcess[str], code: int) -> str:
    assert r.returncode == code, f"exit {r.returncode} (wanted {code})\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("keyward: "), r.stderr
    return r.stderr


def test_the_whole_flow(kw: Run, platform: Clients, pki_dir: Path, tmp_path: Path, new_org_id: str) -> None:
    org, admin = new_org_id, f"org-admin-{new_org_id}"
    # Platform admin: the org, with name constraints (the CSR asks for them; the upload must carry them).
    out = ok(kw("org", "create", org, "--display-name", "Test Org", "--fail-mode", "open",
                "--permit-dns", f"{org}.test", identity="platform-admin"))
    assert f"created organization {org!r}" in out and "FAIL_MODE_OPEN" in out
    got = json.loads(ok(kw("org", "get", org, "-o", "json", identity="platform-admin")))
    assert got["org_id"] == org and got["display_name"] == "Test Org" and got["policy_version"] == "1"
    assert got["policy"]["permitted_dns_subtrees"] == [f"{org}.test"] and got["active_key_id"] == ""
    assert f"--identity {admin}" in ok(kw("dev", "org-admin", org))
    assert (pki_dir / f"{admin}.crt").is_file()

    # Org admin: CSR to a file, a throwaway root, signed, uploaded: ACTIVE.
    out = ok(kw("key", "request", org, "--algorithm", "ec-p256", identity=admin))
    assert (tmp_path / f"{org}.csr").is_file() and str(tmp_path / f"{org}.csr") in out
    csr = x509.load_pem_x509_csr((tmp_path / f"{org}.csr").read_bytes())
    assert csr.extensions.get_extension_for_class(x509.NameConstraints)
    out = ok(kw("dev", "org-root", org))
    assert "NOT FOR PRODUCTION" in out
    root = x509.load_pem_x509_certificate((tmp_path / f"{org}-root" / "root.crt").read_bytes())
    assert "NOT FOR PRODUCTION" in root.subject.rfc4514_string()
    assert "NOT FOR PRODUCTION" in ok(kw("dev", "sign", f"{org}.csr"))
    cert = x509.load_pem_x509_certificate((tmp_path / f"{org}.crt").read_bytes())
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0 and cert.issuer == root.subject
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert cert.extensions.get_extension_for_class(x509.NameConstraints).value == \
        csr.extensions.get_extension_for_class(x509.NameConstraints).value
    assert "is ACTIVE" in ok(kw("key", "upload", org, f"{org}.crt", "--chain", f"{org}-root/root.crt", identity=admin))
    keys = json.loads(ok(kw("key", "list", org, "-o", "json", identity=admin)))["intermediates"]
    assert [k["state"] for k in keys] == ["INTERMEDIATE_STATE_ACTIVE"] and keys[0]["algorithm"] == "KEY_ALGORITHM_EC_P256"
    assert " ACTIVE " in ok(kw("key", "list", org, identity=admin))
    serial = keys[0]["serial_hex"]
    assert serial == format(cert.serial_number, "x")

    # Policy from flags: merged into the current one; what changed is printed.
    out = ok(kw("org", "policy", "set", org, "--fail-mode", "closed", "--location-cidr", "10.1.0.0/16",
                "--block-host", "gambling.example", identity=admin))
    assert "version 1 -> 2" in out and "fail_mode: FAIL_MODE_OPEN -> FAIL_MODE_CLOSED" in out
    assert "location_cidrs: + 10.1.0.0/16" in out and "blocked_hosts: + gambling.example" in out
    assert "no change" in ok(kw("org", "policy", "set", org, "--block-host", "gambling.example", identity=admin))
    # ... and from a YAML file (the whole policy), with a flag on top.
    (tmp_path / "policy.yaml").write_text(
        f"fail_mode: closed\npermitted_dns_subtrees: [{org}.test]\nlocation_cidrs: [10.1.0.0/16, 192.168.7.0/24]\n"
        "blocked_url_prefixes: [news.example/sport]\n")
    out = ok(kw("org", "policy", "set", org, "--file", "policy.yaml", "--do-not-inspect", "bank.example",
                identity=admin))
    assert "version 2 -> 3" in out and "blocked_hosts: - gambling.example" in out
    assert "location_cidrs: + 192.168.7.0/24" in out and "do_not_inspect_hosts: + bank.example" in out
    pol = json.loads(ok(kw("org", "policy", "get", org, "-o", "json", identity=admin)))
    assert pol["fail_mode"] == "FAIL_MODE_CLOSED" and pol["blocked_hosts"] == []
    assert pol["location_cidrs"] == ["10.1.0.0/16", "192.168.7.0/24"]
    assert pol["blocked_url_prefixes"] == ["news.example/sport"] and pol["do_not_inspect_hosts"] == ["bank.example"]
    assert "news.example/sport" in ok(kw("org", "policy", "get", org, identity=admin))
    # policy get -o json is what set --file reads: a round trip changes nothing.
    (tmp_path / "pol.json").write_text(json.dumps(pol))
    assert "no change" in ok(kw("org", "policy", "set", org, "-f", "pol.json", identity=admin))

    # Pools, the audit log, revocation, health.
    pools = json.loads(ok(kw("pool", "list", "-o", "json", identity="platform-admin")))["pools"]
    assert {"public", "private"} <= {p["name"] for p in pools}
    assert "public" in ok(kw("pool", "list", identity="platform-admin"))
    events = json.loads(ok(kw("audit", "list", org, "-o", "json", identity=admin)))["events"]
    actions = [e["action"] for e in events if e["outcome"] == "ok"]
    assert actions[:3] == ["CreateOrganization", "RequestIntermediateCsr", "UploadIntermediateCertificate"]
    assert actions.count("UpdatePolicy") == 2
    assert "UploadIntermediateCertificate" in ok(kw("audit", "list", org, identity=admin))
    out = ok(kw("key", "revoke", org, serial, "--reason", "drill", identity=admin))
    assert "REVOKED" in out
    keys = json.loads(ok(kw("key", "list", org, "-o", "json", identity=admin)))["intermediates"]
    assert [k["state"] for k in keys] == ["INTERMEDIATE_STATE_REVOKED"]
    assert "RevokeIntermediate" in ok(kw("audit", "list", org, identity=admin))
    assert "SERVING" in ok(kw("health", identity=admin))
    assert json.loads(ok(kw("health", "--service", "keyward.v1.Admin", "-o", "json", identity=admin))) == \
        {"status": "SERVING"}


def test_org_list_as_platform_and_as_org_admin(kw: Run, platform: Clients, pki_dir: Path, tmp_path: Path,
                                              new_org_id: str) -> None:
    (tmp_path / "p.json").write_text(json.dumps({"fail_mode": "closed", "blocked_hosts": ["a.example"]}))
    o = json.loads(ok(kw("org", "create", new_org_id, "--policy", "p.json", "--block-host", "b.example", "-o", "json",
                         identity="platform-admin")))
    assert o["policy"]["fail_mode"] == "FAIL_MODE_CLOSED" and o["policy"]["blocked_hosts"] == ["a.example", "b.example"]
    listed = json.loads(ok(kw("org", "list", "-o", "json", identity="platform-admin")))["organizations"]
    assert new_org_id in {o["org_id"] for o in listed}
    assert new_org_id in ok(kw("org", "list", identity="platform-admin"))
    pki.org_admin(pki_dir, new_org_id)
    own = json.loads(ok(kw("org", "list", "-o", "json", identity=f"org-admin-{new_org_id}")))["organizations"]
    assert [o["org_id"] for o in own] == [new_org_id]
    err = one_line_error(kw("org", "list", identity="zen-public"), 1)
    assert "--identity platform-admin" in err


def test_pools_register_bind_unbind_deregister(kw: Run, platform: Clients, new_org_id: str) -> None:
    pool = f"p-{uuid.uuid4().hex[:8]}"
    ok(kw("org", "create", new_org_id, "--private-zen-only", identity="platform-admin"))
    assert "private, serves none" in ok(kw("pool", "register", pool, "--private", identity="platform-admin"))
    got = json.loads(ok(kw("pool", "bind", pool, new_org_id, "-o", "json", identity="platform-admin")))
    assert got == {"name": pool, "visibility": "POOL_VISIBILITY_PRIVATE", "org_ids": [new_org_id],
                   "serves_fail_closed_org": False}
    # Re-registering would cut the org off: refused without --replace.
    err = one_line_error(kw("pool", "register", pool, "--private", identity="platform-admin"), 2)
    assert "--replace" in err and new_org_id in err
    assert "serves none" in ok(kw("pool", "unbind", pool, new_org_id, identity="platform-admin"))
    ok(kw("pool", "deregister", pool, identity="platform-admin"))
    err = one_line_error(kw("pool", "deregister", pool, identity="platform-admin"), 1)
    assert "NOT_FOUND" in err and "not registered" in err


def test_audit_list_pages(kw: Run, platform: Clients) -> None:
    first = ok(kw("audit", "list", "--limit", "2", identity="platform-admin"))
    assert len(first.splitlines()) == 4 and first.splitlines()[-1].startswith("(more: keyward audit list --after-seq ")
    after = first.splitlines()[-1].split()[-1].rstrip(")")
    nxt = json.loads(ok(kw("audit", "list", "--after-seq", after, "--limit", "3", "-o", "json",
                           identity="platform-admin")))["events"]
    assert len(nxt) == 3 and [int(e["seq"]) for e in nxt] == sorted(int(e["seq"]) for e in nxt)
    assert int(nxt[0]["seq"]) > int(after)
    every = json.loads(ok(kw("audit", "list", "--all", "-o", "json", identity="platform-admin")))["events"]
    assert len(every) >= 5 and {e["seq"] for e in nxt} <= {e["seq"] for e in every}


def test_audit_verify_still_reads_the_database(pg: PgCluster, ca: CAProcess) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARD_")}
    env.update(PYTHONPATH=str(ROOT), KEYWARD_DB_DSN=pg.dsn())
    r = subprocess.run([sys.executable, "-m", "control_plane.cli", "audit", "verify"], env=env,
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0 and r.stdout.startswith("audit chain OK"), r.stdout + r.stderr


def test_no_identity_says_what_to_set(kw: Run, pki_dir: Path) -> None:
    err = one_line_error(kw("org", "get", "acme"), 2)
    assert "KEYWARD_IDENTITY" in err and "--identity" in err and str(pki_dir) in err
    assert "NAME.crt" in err and "platform-admin" in err
    err = one_line_error(kw("org", "get", "acme", "--identity", "nobody"), 2)
    for f in ("nobody.crt", "nobody.key", "ca.crt"):
        assert str(pki_dir / f) in err
    err = one_line_error(kw("org", "get", "acme", identity="platform-admin", env={"KEYWARD_PKI_DIR": ""}), 2)
    assert "KEYWARD_PKI_DIR" in err


def test_wrong_role_is_one_line_with_what_to_use(kw: Run, platform: Clients, new_org_id: str) -> None:
    err = one_line_error(kw("org", "create", new_org_id, identity="org-admin-acme"), 1)
    assert "PERMISSION_DENIED" in err and "platform admins only" in err and "--identity platform-admin" in err
    err = one_line_error(kw("key", "list", "globex", identity="org-admin-acme"), 1)
    assert "PERMISSION_DENIED" in err and "--identity org-admin-globex" in err
    err = one_line_error(kw("org", "get", "no-such-org", identity="platform-admin"), 1)
    assert "NOT_FOUND" in err and "'no-such-org' not found" in err


def test_ca_unreachable_exits_3(kw: Run) -> None:
    err = one_line_error(kw("health", "--addr", f"127.0.0.1:{free_port()}", identity="platform-admin"), 3)
    assert "cannot reach the CA" in err and "connection refused" in err


def test_local_problems_exit_2(kw: Run, tmp_path: Path) -> None:
    err = one_line_error(kw("dev", "sign", "missing.csr"), 2)
    assert "cannot read CSR missing.csr" in err
    err = one_line_error(kw("key", "upload", "acme", "missing.crt", "--chain", "root.crt", identity="org-admin-acme"), 2)
    assert "missing.crt" in err
    (tmp_path / "bad.yaml").write_text("fail_mode: closed\nblocked_host: [x.example]\n")
    err = one_line_error(kw("org", "policy", "set", "acme", "--file", "bad.yaml", identity="org-admin-acme"), 2)
    assert "blocked_host" in err and "blocked_hosts" in err
    r = kw("key", "request", "acme", "-o", "acme.csr", identity="org-admin-acme")
    assert r.returncode == 2 and "--out FILE" in r.stderr and not (tmp_path / "acme.csr").exists()


def test_help_version_and_completion(kw: Run, tmp_path: Path) -> None:
    top = ok(kw("--help"))
    assert "exit codes:" in top and "KEYWARD_IDENTITY" in top and "docs/cli.md" in top
    for cmd in (["org", "policy", "set"], ["key", "request"], ["pool", "register"], ["audit", "list"], ["health"]):
        h = ok(kw(*cmd, "--help"))
        assert all(v in h for v in ("KEYWARD_CA_ADDR", "KEYWARD_IDENTITY", "KEYWARD_PKI_DIR", "exit codes:",
                                    "example:")), cmd
    assert ok(kw("--version")).startswith("keyward ")
    script = tmp_path / "kw.bash"
    script.write_text(ok(kw("completion", "bash")))
    probe = (f'source {script}\n'
             'c() { COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]}-1)); COMPREPLY=(); _keyward; '
             'echo "${COMPREPLY[*]}"; }\n'
             'c keyward org policy ""\nc keyward key request acme --algorithm ec\nc keyward org get acme -o ""\n'
             'c keyward key list --identity pl\n')
    for f in ("platform-admin.crt", "platform-admin.key", "ca.crt", "ca.key"):
        (tmp_path / f).write_text("")
    r = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30,
                       env={"PATH": os.environ["PATH"], "KEYWARD_PKI_DIR": str(tmp_path)})
    assert r.stdout.splitlines() == ["get set", "ec-p256 ec-p384", "table json", "platform-admin"], \
        r.stdout + r.stderr
    assert ok(kw("completion", "zsh")).count("bashcompinit") == 2


def test_a_ca_without_its_database_answers_unavailable_exit_4(
        kw: Run, workdir: Path, pki_dir: Path, master_secret: tuple[bytes, Path]) -> None:
    """The CA's own UNAVAILABLE (no database) is an answer that says "not now" (exit 4, with the request
    id to retry a write with: common.status RETRY), neither an unreachable CA (exit 3) nor a refusal
    (exit 1, which running the command again does not change)."""
    cluster = PgCluster(workdir / f"none-{uuid.uuid4().hex[:6]}", (free_port(), free_port(), free_port()))
    ca = start_ca(cluster, pki_dir, master_secret[1], workdir / "ca-nodb", wait_serving=False)
    try:
        wait_for(lambda: "could not ensure the schema" in ca.log_text(), 30, "the CA to find no database")
        env = {"KEYWARD_CA_ADDR": ca.addr}
        r = kw("health", identity="platform-admin", env=env)
        assert r.returncode == 1 and "NOT_SERVING" in r.stdout, r.stdout + r.stderr
        err = one_line_error(kw("org", "create", "nodb", "--request-id", "retry-me", identity="platform-admin",
                                env=env), 4)
        assert err.startswith("keyward: UNAVAILABLE: ") and "--request-id retry-me" in err
    finally:
        ca.stop()
