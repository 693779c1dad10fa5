"""A real ZEN (`python -m data_plane`) between real clients (curl, openssl)
and local HTTPS origins, with keys from a real CA over mTLS.

Origins: a test "web PKI" root (given to the ZEN as an extra root) signs
good.test, dni.test and blocked.test; bad.test presents a self-signed
certificate. The ZEN resolves those names to 127.0.0.1 (KEYWARD_ZEN_RESOLVE).
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from devstack import pki
from devstack.pg import PgCluster
from protos.keyward.v1 import keyward_pb2 as pb
from tests.helpers import CAProcess, Clients, OrgRoot, clients, wait_for
from tests.integration.flow import PROXY_SECRET, activate, create_org, org_admin

ROOT = Path(__file__).resolve().parents[2]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/upgrade" and self.headers.get("Upgrade") == "echo":
            # A protocol switch (as WebSocket does): afterwards, every byte comes back.
            self.send_response(101)
            self.send_header("Connection", "Upgrade")
            self.send_header("Upgrade", "echo")
            self.end_headers()
            self.wfile.flush()
            while data := self.connection.recv(4096):
                self.connection.sendall(data)
            self.close_connection = True
            return
        body = f"hello from {self.headers.get('Host', '?')} {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802  (http.server answers "Expect: 100-continue" first)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a: object) -> None:
        pass


def _origin(cert: Path, key: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, srv.server_address[1]


@dataclass
class Web:
    root_crt: Path
    port: int  # good.test, dni.test, blocked.test (one server, SANs for all)
    bad_port: int  # bad.test, self-signed


@pytest.fixture(scope="module")
def web(workdir: Path) -> Iterator[Web]:
    d = workdir / "web"
    d.mkdir(exist_ok=True)
    ca, ca_key = pki.build_cert(subject_cn="test web root", issuer=None, issuer_key=None, is_ca=True)
    pki.write_identity(d, "root", ca, ca_key)
    srv_cert, srv_key = pki.build_cert(subject_cn="good.test", issuer=ca, issuer_key=ca_key, server=True,
                                       dns=["good.test", "dni.test", "blocked.test", "www.good.test"])
    pki.write_identity(d, "site", srv_cert, srv_key)
    bad, bad_key = pki.build_cert(subject_cn="bad.test", issuer=None, issuer_key=None, server=True, dns=["bad.test"])
    pki.write_identity(d, "bad", bad, bad_key)
    s1, p1 = _origin(d / "site.crt", d / "site.key")
    s2, p2 = _origin(d / "bad.crt", d / "bad.key")
    yield Web(d / "root.crt", p1, p2)
    s1.shutdown()
    s2.shutdown()


@dataclass
class Zen:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path


def zen_env(ca: CAProcess, pki_dir: Path, master: Path, web: Web, who: str = "zen-public",
            extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a test ZEN: this CA, ``who``'s identity, ``web``'s names and root."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARD_")}
    env.update(KEYWARD_ZEN_LISTEN="127.0.0.1:0", KEYWARD_ZEN_METRICS_LISTEN="127.0.0.1:0", KEYWARD_CA_ADDR=ca.addr,
               KEYWARD_ZEN_TLS_CERT_FILE=str(pki_dir / f"{who}.crt"), KEYWARD_ZEN_TLS_KEY_FILE=str(pki_dir / f"{who}.key"),
               KEYWARD_ZEN_CA_TRUST_FILE=str(pki_dir / "ca.crt"), KEYWARD_MASTER_SECRET_FILE=str(master),
               KEYWARD_ZEN_EXTRA_ROOTS_FILE=str(web.root_crt),
               KEYWARD_ZEN_RESOLVE="good.test=127.0.0.1,www.good.test=127.0.0.1,dni.test=127.0.0.1,blocked.test=127.0.0.1,bad.test=127.0.0.1")
    env.update(extra or {})
    return env


def start_zen(ca: CAProcess, pki_dir: Path, master: Path, web: Web, workdir: Path, who: str = "zen-public",
              extra: dict[str, str] | None = None, python: str = sys.executable) -> Zen:
    log = workdir / f"zen-{uuid.uuid4().hex[:6]}.log"
    env = zen_env(ca, pki_dir, master, web, who, extra)
    with open(log, "wb") as out:  # the child has its own copy of the descriptor
        proc = subprocess.Popen([python, "-m", "data_plane"], env=env, cwd=ROOT, stdout=out, stderr=out)

    def port() -> int | None:
        if proc.poll() is not None:
            raise AssertionError(f"ZEN exited {proc.returncode}: {log.read_text()[-2000:]}")
        for line in log.read_text().splitlines():
            if line.startswith("{") and '"ZEN listening"' in line:
                return int(json.loads(line)["port"])
        return None

    return Zen(proc, wait_for(port, 30, "the ZEN to listen"), log)


def in_log(zen: Zen, *needles: str, timeout: float = 10) -> str:
    """The ZEN's log once it holds every one of ``needles`` (its lines are written by a thread
    of their own, a moment after what they tell: waited for, bounded)."""
    def ready() -> str | None:
        text = zen.log.read_text()
        return text if all(n in text for n in needles) else None
    found: str = wait_for(ready, timeout, f"{needles} in the ZEN's log")
    return found


@pytest.fixture(scope="module")
def org(ca: CAProcess, platform: Clients, pki_dir: Path, tmp_path_factory: pytest.TempPathFactory
        ) -> tuple[str, OrgRoot, Clients]:
    org_id = f"z-{uuid.uuid4().hex[:8]}"
    create_org(platform, org_id, do_not_inspect_hosts=["dni.test"], blocked_hosts=["blocked.test"],
               blocked_url_prefixes=["good.test/private/"])
    admin = org_admin(ca.addr, pki_dir, org_id)
    root = OrgRoot.create(tmp_path_factory.mktemp("zroot"), org_id)
    activate(admin, root, org_id)
    return org_id, root, admin


@pytest.fixture(scope="module")
def zen(ca: CAProcess, pki_dir: Path, master_secret: tuple[bytes, Path], web: Web, workdir: Path,
        org: tuple[str, OrgRoot, Clients]) -> Iterator[Zen]:
    z = start_zen(ca, pki_dir, master_secret[1], web, workdir)
    yield z
    z.proc.terminate()
    z.proc.wait(15)


def curl(zen: Zen, org_id: str, url: str, cacert: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "--max-time", "20", "--proxy", f"http://127.0.0.1:{zen.port}",
                           "--proxy-user", f"{org_id}:{PROXY_SECRET}", "--cacert", str(cacert), "-w", "\n%{http_code}", url],
                          capture_output=True, text=True, timeout=30)


def served_chain(zen: Zen, org_id: str, host: str, port: int, sni: str | None = None) -> list[x509.Certificate]:
    r = subprocess.run(["openssl", "s_client", "-proxy", f"127.0.0.1:{zen.port}", "-proxy_user", org_id,
                        "-proxy_pass", f"pass:{PROXY_SECRET}", "-connect", f"{host}:{port}", "-servername", sni or host,
                        "-showcerts"],
                       input="", capture_output=True, text=True, timeout=30)
    pems = r.stdout.split("-----BEGIN CERTIFICATE-----")[1:]
    return [x509.load_pem_x509_certificate(("-----BEGIN CERTIFICATE-----" + p.split("-----END CERTIFICATE-----")[0]
                                             + "-----END CERTIFICATE-----\n").encode()) for p in pems]


def test_curl_through_the_zen_sees_a_leaf_from_the_org_intermediate(
    zen: Zen, web: Web, org: tuple[str, OrgRoot, Clients],
) -> None:
    org_id, root, admin = org
    r = curl(zen, org_id, f"https://good.test:{web.port}/hello", root.crt)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("hello from good.test") and r.stdout.endswith("200")
    # Keep-alive: two requests over one intercepted tunnel.
    r = subprocess.run(["curl", "-sS", "-v", "--max-time", "20", "--proxy", f"http://127.0.0.1:{zen.port}",
                        "--proxy-user", f"{org_id}:{PROXY_SECRET}", "--cacert", str(root.crt),
                        f"https://good.test:{web.port}/ka1", f"https://good.test:{web.port}/ka2"],
                       capture_output=True, text=True, timeout=30)
    assert "/ka1" in r.stdout and "/ka2" in r.stdout and "Re-using existing connection" in r.stderr, r.stderr[-800:]
    chain = served_chain(zen, org_id, "good.test", web.port)
    inter = [i for i in admin.admin.ListIntermediates(pb.ListIntermediatesRequest(org_id=org_id), timeout=30).intermediates
             if i.state == pb.INTERMEDIATE_STATE_ACTIVE][0]
    assert len(chain) == 2 and format(chain[1].serial_number, "x") == inter.serial_hex
    chain[0].verify_directly_issued_by(chain[1])
    sans = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "good.test" in sans.get_values_for_type(x509.DNSName)
    assert "www.good.test" in sans.get_values_for_type(x509.DNSName)  # copied from the origin
    # The leaf names the client's SNI when it differs from the CONNECT host.
    by_sni = served_chain(zen, org_id, "good.test", web.port, sni="www.good.test")
    assert by_sni[0].subject.rfc4514_string() == "CN=www.good.test"


def test_policy_blocks_tunnels_and_refuses_untrusted_origins(
    zen: Zen, web: Web, org: tuple[str, OrgRoot, Clients],
) -> None:
    org_id, root, _ = org
    r = curl(zen, org_id, f"https://bad.test:{web.bad_port}/", root.crt)
    # Never silently trusted: the origin is checked under the name the client asked for (after its
    # ClientHello), and the client reads why, in a 502 page over TLS with a leaf for that name.
    assert r.stdout.endswith("502") and "is not trusted" in r.stdout, (r.stdout, r.stderr)
    r = curl(zen, org_id, f"https://blocked.test:{web.port}/", root.crt)
    assert r.returncode != 0 and "403" in r.stderr, r.stderr
    r = curl(zen, org_id, f"https://good.test:{web.port}/private/x", root.crt)
    assert r.stdout.endswith("403") and "blocked by your organization" in r.stdout
    # do-not-inspect: the client sees the origin's own certificate.
    chain = served_chain(zen, org_id, "dni.test", web.port)
    assert chain and chain[0].issuer.rfc4514_string() == "CN=test web root"
    in_log(zen, '"path": "/hello"', '"status": 200')  # each inspected request is logged


def test_private_only_org_is_never_decrypted_by_a_public_zen(
    zen: Zen, web: Web, ca: CAProcess, platform: Clients, pki_dir: Path, tmp_path: Path, pg: PgCluster,
) -> None:
    org_id = f"p-{uuid.uuid4().hex[:8]}"
    create_org(platform, org_id, private_zen_only=True)
    root = OrgRoot.create(tmp_path, org_id)
    activate(org_admin(ca.addr, pki_dir, org_id), root, org_id)
    r = curl(zen, org_id, f"https://good.test:{web.port}/hello", root.crt)
    assert r.returncode != 0 and "407" in r.stderr, r.stderr  # no key, no policy: nothing decrypted
    # The CONNECT itself is refused (407): no TLS handshake, no certificate at all.
    assert served_chain(zen, org_id, "good.test", web.port) == []
    # The ZEN did ask; the CA refused and audited it.
    outcomes = pg.psql(f"SELECT actor || ' ' || outcome FROM audit_events WHERE org_id = '{org_id}' "
                       "AND action = 'GetKeyPair'").splitlines()
    assert outcomes and all(o == "spiffe://keyward/zen-pool/public PERMISSION_DENIED" for o in outcomes), outcomes


def test_rotation_and_revocation_reach_new_connections(
    zen: Zen, web: Web, org: tuple[str, OrgRoot, Clients],
) -> None:
    org_id, root, admin = org
    assert curl(zen, org_id, f"https://good.test:{web.port}/warm", root.crt).returncode == 0
    _, inter, cert_pem = activate(admin, root, org_id)
    t0 = time.monotonic()
    new_serial = int(inter.serial_hex, 16)
    wait_for(lambda: (lambda c: len(c) == 2 and c[1].serial_number == new_serial)(
        served_chain(zen, org_id, "good.test", web.port)), 10, "connections to use the new intermediate")
    print(f"\nrotation reached new connections in {time.monotonic() - t0:.2f}s")
    admin.admin.RevokeIntermediate(pb.RevokeIntermediateRequest(org_id=org_id, key_id=inter.key_id), timeout=30)
    wait_for(lambda: (lambda c: bool(c) and c[0].issuer.rfc4514_string() == "CN=test web root")(
        served_chain(zen, org_id, "good.test", web.port)), 10, "revocation to stop interception")
    # Fail-open org without a key: tunnelled, the origin's own certificate.


def _procs(pid: int) -> list[int]:
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [int(k) for k in kids]


def _holders(pids: list[int], needles: list[bytes]) -> set[int]:
    from tests.data_plane.test_signer import _scan_process

    return {p for p in pids if os.path.exists(f"/proc/{p}") and _scan_process(p, needles)}


def _key_needles(ca: CAProcess, pki_dir: Path, secret: bytes, org_id: str) -> list[bytes]:
    """Private parts of the org's active key: PKCS#8 DER slices inside d and
    qinv (the modulus is public), and the primes in OpenSSL's little-endian limbs."""
    from data_plane.keyopen import open_org_key
    from keylib.master import MasterSecret

    kp = clients(ca.addr, pki_dir, "zen-public").keys.GetKeyPair(pb.GetKeyPairRequest(org_id=org_id), timeout=30)
    m = MasterSecret.from_bytes(secret)
    buf = open_org_key(m, org_id=org_id, key_id=kp.key_id, keylib_format=kp.keylib_format,
                       sealed=kp.encrypted_private_key, certificate_pem=kp.certificate_pem)
    der = bytes(buf.view)
    key = serialization.load_der_private_key(der, None)
    buf.wipe()
    m.wipe()
    nums = key.private_numbers()  # type: ignore[union-attr]
    return [der[320:368], der[-64:-16], nums.p.to_bytes(128, "little")[:48],  # type: ignore[union-attr]
            nums.q.to_bytes(128, "little")[:48]]  # type: ignore[union-attr]


def test_key_in_locked_memory_only_while_in_use_and_no_files_written(
    ca: CAProcess, platform: Clients, pki_dir: Path, master_secret: tuple[bytes, Path], web: Web, workdir: Path,
    tmp_path: Path,
) -> None:
    org_id = f"m-{uuid.uuid4().hex[:8]}"
    create_org(platform, org_id, key_idle_timeout_seconds=10)
    admin = org_admin(ca.addr, pki_dir, org_id)
    root = OrgRoot.create(tmp_path, org_id)
    _, inter, _ = activate(admin, root, org_id)
    needles = _key_needles(ca, pki_dir, master_secret[0], org_id)

    z = start_zen(ca, pki_dir, master_secret[1], web, workdir)
    trace = workdir / f"strace-{uuid.uuid4().hex[:6]}.txt"
    st = subprocess.Popen(["strace", "-f", "-qq", "-p", str(z.proc.pid), "-e",
                           "trace=open,openat,creat,rename,renameat,renameat2,unlink,unlinkat,mkdir", "-o", str(trace)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # strace attaches asynchronously; it has no readiness signal
        for i in range(3):
            r = curl(z, org_id, f"https://good.test:{web.port}/m{i}", root.crt)
            assert r.returncode == 0, r.stderr
        pids = _procs(z.proc.pid)
        assert len(pids) >= 2, "a signer process holds the org key"
        holders = _holders(pids, needles)
        assert holders and z.proc.pid not in holders, (holders, z.proc.pid)  # only the signer has it
        with open(f"/proc/{z.proc.pid}/limits") as f:
            assert any(ln.startswith("Max core file size") and ln.split()[4:6] == ["0", "0"] for ln in f)
        st.terminate()
        st.wait(10)
        written = [ln for ln in trace.read_text().splitlines()
                   if ("O_WRONLY" in ln or "O_RDWR" in ln or "O_CREAT" in ln or "rename" in ln or "unlink" in ln
                       or "mkdir" in ln) and "/dev/null" not in ln and "ENOENT" not in ln]
        assert not written, written[:5]
        # Revocation: the key leaves every ZEN process at once.
        admin.admin.RevokeIntermediate(pb.RevokeIntermediateRequest(org_id=org_id, key_id=inter.key_id), timeout=30)
        wait_for(lambda: not _holders(_procs(z.proc.pid), needles), 10, "the key to leave the ZEN's memory")
    finally:
        if st.poll() is None:
            st.kill()
        z.proc.terminate()
        z.proc.wait(15)


def test_idle_key_is_dropped_and_refetched(
    ca: CAProcess, platform: Clients, pki_dir: Path, master_secret: tuple[bytes, Path], web: Web, workdir: Path,
    tmp_path: Path,
) -> None:
    org_id = f"i-{uuid.uuid4().hex[:8]}"
    create_org(platform, org_id, key_idle_timeout_seconds=10)
    root = OrgRoot.create(tmp_path, org_id)
    activate(org_admin(ca.addr, pki_dir, org_id), root, org_id)
    needles = _key_needles(ca, pki_dir, master_secret[0], org_id)
    z = start_zen(ca, pki_dir, master_secret[1], web, workdir)
    try:
        assert curl(z, org_id, f"https://good.test:{web.port}/a", root.crt).returncode == 0
        signer_pids = _procs(z.proc.pid)[1:]
        assert signer_pids and _holders(_procs(z.proc.pid), needles)
        wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in signer_pids), 20,
                 "the idle key's signer to end")
        assert not _holders(_procs(z.proc.pid), needles), "an idle-dropped key left a copy in the ZEN"
        assert curl(z, org_id, f"https://good.test:{web.port}/b", root.crt).returncode == 0  # fetched again
        in_log(z, "dropped key of")
    finally:
        z.proc.terminate()
        z.proc.wait(15)


def test_ca_down_cached_orgs_keep_working_uncached_follow_fail_mode_and_recovery(
    pg: object, pki_dir: Path, master_secret: tuple[bytes, Path], web: Web, workdir: Path,
    ca: CAProcess, platform: Clients, tmp_path: Path,
) -> None:
    """A ZEN attached to its own CA process, which is stopped and started again."""
    from tests.helpers import start_ca

    cached, uncached_open, uncached_closed = (f"{p}-{uuid.uuid4().hex[:6]}" for p in ("cc", "uo", "uc"))
    roots = {}
    for o, closed in ((cached, False), (uncached_open, False), (uncached_closed, True)):
        create_org(platform, o, fail_mode=pb.FAIL_MODE_CLOSED if closed else pb.FAIL_MODE_OPEN)
        roots[o] = OrgRoot.create(tmp_path, o)
        activate(org_admin(ca.addr, pki_dir, o), roots[o], o)
    own = start_ca(pg, pki_dir, master_secret[1], workdir / "ca-zen-down")  # type: ignore[arg-type]
    z = start_zen(own, pki_dir, master_secret[1], web, workdir)
    try:
        url = f"https://good.test:{web.port}/x"
        wait_for(lambda: curl(z, cached, url, roots[cached].crt).returncode == 0, 15, "the first interception")
        own.stop()  # the CA is gone; the ZEN keeps what it has
        for _ in range(3):
            r = curl(z, cached, url, roots[cached].crt)
            assert r.returncode == 0 and r.stdout.endswith("200"), r.stderr
        chain = served_chain(z, uncached_open, "good.test", web.port)  # never fetched: not decrypted
        assert chain and chain[0].issuer.rfc4514_string() == "CN=test web root"
        r = curl(z, uncached_closed, url, roots[uncached_closed].crt)
        assert r.returncode != 0 and "503" in r.stderr, r.stderr
        # The CA returns on the same port; the ZEN recovers by itself.
        back = start_ca(pg, pki_dir, master_secret[1], workdir / "ca-zen-back",  # type: ignore[arg-type]
                        KEYWARD_CA_LISTEN=f"127.0.0.1:{own.port}")
        try:
            wait_for(lambda: curl(z, uncached_open, url, roots[uncached_open].crt).returncode == 0, 30,
                     "the uncached org to be intercepted once the CA is back")
        finally:
            back.stop()
    finally:
        own.stop()
        z.proc.terminate()
        z.proc.wait(15)


def test_plain_http_pac_source_network_and_metrics(
    ca: CAProcess, platform: Clients, pki_dir: Path, master_secret: tuple[bytes, Path], web: Web, workdir: Path,
) -> None:
    org_id = f"n-{uuid.uuid4().hex[:6]}"
    # This org owns 127.0.0.2: connections from there map to it without proxy authentication
    # (every other test connects from 127.0.0.1, and every ZEN learns of the org when it is created).
    create_org(platform, org_id, location_cidrs=["127.0.0.2/32"], blocked_url_prefixes=["good.test/nope"])
    plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    z = start_zen(ca, pki_dir, master_secret[1], web, workdir)
    try:
        base = ["curl", "-sS", "--max-time", "20", "--interface", "127.0.0.2", "--proxy", f"http://127.0.0.1:{z.port}",
                "-w", "\n%{http_code}"]
        wait_for(lambda: subprocess.run(base + [f"http://good.test:{plain.server_address[1]}/ok"], capture_output=True,
                                        text=True, timeout=30).stdout.endswith("200"), 15, "plain HTTP via the ZEN")
        r = subprocess.run(base + [f"http://good.test:{plain.server_address[1]}/nope/x"], capture_output=True,
                           text=True, timeout=30)
        assert r.stdout.endswith("403")
        pac = subprocess.run(["curl", "-sS", f"http://127.0.0.1:{z.port}/proxy.pac"], capture_output=True, text=True,
                             timeout=30).stdout
        assert "FindProxyForURL" in pac and f"PROXY 127.0.0.1:{z.port}" in pac
        mport = next(int(json.loads(ln)["port"]) for ln in z.log.read_text().splitlines()
                     if ln.startswith("{") and '"metrics listening"' in ln)
        m = subprocess.run(["curl", "-sS", f"http://127.0.0.1:{mport}/metrics"], capture_output=True, text=True,
                           timeout=30).stdout
        assert f'keyward_zen_connections_total{{org="{org_id}"}}' in m
        assert f'keyward_zen_requests_total{{org="{org_id}",status="403"}} 1.0' in m
        assert "keyward_zen_ca_reachable 1.0" in m
    finally:
        plain.shutdown()
        z.proc.terminate()
        z.proc.wait(15)


def test_an_http2_client_is_inspected_request_by_request_toward_an_http1_origin(
    zen: Zen, web: Web, org: tuple[str, OrgRoot, Clients],
) -> None:
    """curl offers h2, the origin (Python's http.server) speaks HTTP/1.1 only: the ZEN speaks
    HTTP/2 to the client and HTTP/1.1 to the origin. Two requests multiplexed on one
    connection: the blocked prefix gets its 403 on its stream, the other completes."""
    org_id, root, admin = org
    activate(admin, root, org_id)  # an active key, whatever earlier tests did to the org
    base = f"https://good.test:{web.port}"
    r = subprocess.run(["curl", "-sS", "-v", "--http2", "--max-time", "20", "--parallel",
                        "--proxy", f"http://127.0.0.1:{zen.port}", "--proxy-user", f"{org_id}:{PROXY_SECRET}",
                        "--cacert", str(root.crt), "-w", "%{http_version} %{http_code} %{url_effective}\n",
                        f"{base}/private/secret", f"{base}/open"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr[-1500:]
    assert f"2 403 {base}/private/secret" in r.stdout and f"2 200 {base}/open" in r.stdout, r.stdout
    assert f"hello from good.test:{web.port} /open" in r.stdout and "is blocked by your organization" in r.stdout
    # (One connection or two is curl's choice: it may start the second transfer before it knows the
    # first connection multiplexes. tests/integration/test_zen_h2.py shows one connection with nghttp.)

    def logged() -> dict[str, dict[str, object]] | None:  # written once each stream has ended
        lines = [json.loads(ln) for ln in zen.log.read_text().splitlines() if ln.startswith('{"org": "' + org_id)]
        found = {ln["path"]: ln for ln in lines if ln.get("path") in ("/private/secret", "/open")}
        return found if len(found) == 2 else None
    mine: dict[str, Any] = wait_for(logged, 10, "both requests in the access log")
    assert mine["/private/secret"]["status"] == 403 and mine["/private/secret"]["blocked"] is True
    assert mine["/open"]["status"] == 200 and mine["/open"]["bytes"] == len(f"hello from good.test:{web.port} /open\n")
    for ln in mine.values():
        assert ln["protocol"] == "h2" and ln["origin_protocol"] == "http/1.1" and ln["stream"] % 2 == 1


def test_http1_expect_continue_and_an_upgrade_pass_through(
    zen: Zen, web: Web, org: tuple[str, OrgRoot, Clients], tmp_path: Path,
) -> None:
    """HTTP/1.1 on both sides: the origin's 100 Continue reaches a client that waits for it before
    sending its body, and a 101 upgrade (as WebSocket) is relayed both ways after the decision."""
    org_id, root, admin = org
    activate(admin, root, org_id)
    (tmp_path / "body").write_bytes(b"y" * 5000)
    r = subprocess.run(["curl", "-sS", "-v", "--http1.1", "--max-time", "20", "--expect100-timeout", "15",
                        "--proxy", f"http://127.0.0.1:{zen.port}", "--proxy-user", f"{org_id}:{PROXY_SECRET}",
                        "--cacert", str(root.crt), "-H", "Expect: 100-continue", "--data-binary",
                        f"@{tmp_path / 'body'}", f"https://good.test:{web.port}/echo"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout == "y" * 5000, r.stderr[-1500:]
    assert "< HTTP/1.1 100 Continue" in r.stderr
    sock = socket.create_connection(("127.0.0.1", zen.port), timeout=10)
    cred = base64.b64encode(f"{org_id}:{PROXY_SECRET}".encode()).decode()
    sock.sendall(f"CONNECT good.test:{web.port} HTTP/1.1\r\nProxy-Authorization: Basic {cred}\r\n\r\n".encode())
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    tls = ssl.create_default_context(cafile=str(root.crt)).wrap_socket(sock, server_hostname="good.test")
    tls.sendall(b"GET /upgrade HTTP/1.1\r\nHost: good.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += tls.recv(1)
    assert head.startswith(b"HTTP/1.1 101")
    for word in (b"ping", b"pong" * 1000):
        tls.sendall(word)
        got = b""
        while len(got) < len(word):
            got += tls.recv(65536)
        assert got == word
    tls.close()


def test_a_request_two_parsers_could_frame_differently_is_refused(
    zen: Zen, web: Web, org: tuple[str, OrgRoot, Clients],
) -> None:
    """Request smuggling: Content-Length and Transfer-Encoding together, where an origin reading
    Content-Length would take a hidden second request (to a blocked prefix) for the next one."""
    org_id, root, admin = org
    activate(admin, root, org_id)
    sock = socket.create_connection(("127.0.0.1", zen.port), timeout=10)
    cred = base64.b64encode(f"{org_id}:{PROXY_SECRET}".encode()).decode()
    sock.sendall(f"CONNECT good.test:{web.port} HTTP/1.1\r\nProxy-Authorization: Basic {cred}\r\n\r\n".encode())
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    tls = ssl.create_default_context(cafile=str(root.crt)).wrap_socket(sock, server_hostname="good.test")
    hidden = b"GET /private/secret HTTP/1.1\r\nHost: good.test\r\n\r\n"
    tls.sendall(b"POST /echo HTTP/1.1\r\nHost: good.test\r\nContent-Length: %d\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n%b" % (5 + len(hidden), hidden))
    answer = b""
    while chunk := tls.recv(65536):
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 400") and b"request smuggling" in answer, answer[:300]
    assert b"hello from" not in answer


def test_bypass_relay_decrypts_nothing(web: Web, workdir: Path) -> None:
    log = workdir / f"bypass-{uuid.uuid4().hex[:6]}.log"
    env = dict(os.environ, KEYWARD_BYPASS_LISTEN="127.0.0.1:0")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "data_plane.bypass"], env=env, cwd=ROOT, stdout=out, stderr=out)
    try:
        port = wait_for(lambda: next((int(json.loads(ln)["port"]) for ln in log.read_text().splitlines()
                                      if '"bypass listening"' in ln), None), 15, "the bypass relay")
        # --connect-to: the relay is asked to CONNECT to 127.0.0.1; curl still verifies good.test.
        r = subprocess.run(["curl", "-sS", "--max-time", "20", "--proxy", f"http://127.0.0.1:{port}",
                            "--cacert", str(web.root_crt), "--connect-to", f"good.test:{web.port}:127.0.0.1:{web.port}",
                            f"https://good.test:{web.port}/via-bypass"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "/via-bypass" in r.stdout, r.stderr  # the origin's own certificate verified
    finally:
        proc.terminate()
        proc.wait(10)


def _to_origin(port: int) -> int:
    """ESTABLISHED TCP connections whose remote end is the origin's port (the ZEN's side of them)."""
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[2].split(":")[1], 16) == port and f[3] == "01":
            n += 1
    return n


def test_a_failed_client_handshake_closes_the_origin_connection(
    zen: Zen, web: Web, org: tuple[str, OrgRoot, Clients],
) -> None:
    """Adversarial: CONNECT, then bytes that are not TLS (or a hang-up after the ServerHello).
    Each used to leave the origin connection open for good (+300 sockets per 500 CONNECTs)."""
    org_id = org[0]
    base = _to_origin(web.port)
    auth = base64.b64encode(f"{org_id}:{PROXY_SECRET}".encode()).decode()
    socks = []
    for i in range(30):
        s = socket.create_connection(("127.0.0.1", zen.port), timeout=10)
        s.sendall(f"CONNECT good.test:{web.port} HTTP/1.1\r\nHost: good.test:{web.port}\r\n"
                  f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode())
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = s.recv(4096)
            assert chunk, got
            got += chunk
        assert got.startswith(b"HTTP/1.1 200"), got
        if i % 2:
            s.sendall(b"this is not TLS at all\r\n\r\n")
        else:
            s.close()  # a hang-up instead
            continue
        socks.append(s)
    for s in socks:  # the ZEN drops each bad client (a close, or a reset: it left bytes unread)...
        try:
            while s.recv(4096):
                pass
        except ConnectionResetError:
            pass
        s.close()
    # ...and each origin connection with it.
    wait_for(lambda: _to_origin(web.port) <= base, 15, "the ZEN's connections to the origin to close")


def test_the_leaf_names_only_what_the_origin_proved_and_sni_tricks_lift_no_policy(
    zen: Zen, web: Web, org: tuple[str, OrgRoot, Clients],
) -> None:
    """Adversarial (CONNECT/SNI mismatch). The ZEN used to verify the origin under the CONNECT host,
    then mint a leaf for the SNI, which nobody had verified; and decided block / do-not-inspect on the
    CONNECT host while the leaf named the SNI. Now the ClientHello is read first and one name rules."""
    org_id, root, _ = org

    def sans(chain: list[x509.Certificate]) -> list[str]:
        ext = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return [str(n) for n in ext.get_values_for_type(x509.DNSName)]
    # The origin's certificate covers www.good.test: intercepted under the SNI, the leaf names it.
    chain = served_chain(zen, org_id, "good.test", web.port, sni="www.good.test")
    assert chain and "www.good.test" in sans(chain) and chain[0].issuer.rfc4514_string() != "CN=test web root"
    # An SNI the origin cannot prove: no leaf for it comes from the origin's answer. The client gets our
    # 502 page (under a leaf for the name it asked for), never the origin's content.
    r = subprocess.run(["curl", "-sS", "--max-time", "20", "--proxy", f"http://127.0.0.1:{zen.port}",
                        "--proxy-user", f"{org_id}:{PROXY_SECRET}", "--cacert", str(root.crt), "--connect-to",
                        f"evil.test:{web.port}:good.test:{web.port}", "-w", "\n%{http_code}",
                        f"https://evil.test:{web.port}/hello"], capture_output=True, text=True, timeout=30)
    assert r.stdout.endswith("502") and "hello from" not in r.stdout, (r.stdout, r.stderr)
    # A do-not-inspect SNI does not carry a client, unseen, to another CONNECT host (domain fronting),
    # and a blocked SNI is not lifted by an allowed CONNECT host: no certificate at all, the ZEN closes.
    assert served_chain(zen, org_id, "good.test", web.port, sni="dni.test") == []
    assert served_chain(zen, org_id, "good.test", web.port, sni="blocked.test") == []
    # The matching case still tunnels without decryption: the origin's own certificate.
    chain = served_chain(zen, org_id, "dni.test", web.port)
    assert chain and chain[0].issuer.rfc4514_string() == "CN=test web root"
    in_log(zen, '"sni": "dni.test"', "not tunnelled uninspected")
