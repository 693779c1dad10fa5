"""A real Kubernetes control plane on this machine, for ``make e2e``.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler (built from
Go modules by ``scripts/kube-bins.sh``) and kwok (the kubelets: fake nodes
whose pods turn Running and Ready). Everything runs inside one network
namespace made for the run (``python -m tests.e2e.cluster run`` enters it),
so the cluster's addresses exist nowhere else and ports never clash with the
host: the API server listens on the namespace's bridge address (pods reach
it there, as in-cluster clients reach ``kubernetes.default``), the other
components on the namespace's loopback.

The API server is set up as a cluster's would be: certificates made on the
fly, a service-account signing key, ``Node,RBAC`` authorization, and the
default admission chain (PodSecurity included). Its data lives on tmpfs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[2]
KUBE_VERSION = "v1.35.4"
KWOK_VERSION = "v0.8.0"
BRIDGE = "kwbr0"
BRIDGE_IP = "10.233.255.254"
"""The namespace's bridge: the API server's address for pods and for the tests."""
POD_CIDR = "10.233.0.0/16"
SERVICE_CIDR = "10.96.0.0/16"
API_PORT = 6443


def bin_dir() -> Path:
    base = Path(os.environ.get("KEYWARD_KUBE_CACHE") or Path.home() / ".cache" / "keyward")
    return base / f"kube-{KUBE_VERSION}-kwok-{KWOK_VERSION}"


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _cert(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Certificate, Any] | None, *,
          ca: bool = False, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (), server: bool = False
          ) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(subject)
         .issuer_name(issuer[0].subject if issuer else subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage(
            [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH] if server else [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False)
    if dns or ips:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]), critical=False)
    return b.sign(issuer[1] if issuer else key, hashes.SHA256())


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _pem(obj: Any) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return bytes(obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))


@dataclass
class Cluster:
    """One control plane; ``start()`` brings it up, ``stop()`` takes everything down."""

    root: Path
    """Where its certificates, kubeconfigs, logs and etcd data live (tmpfs)."""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def kubeconfig(self) -> Path:
        return self.root / "admin.kubeconfig"

    @property
    def server(self) -> str:
        return f"https://{BRIDGE_IP}:{API_PORT}"

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    # -- PKI -------------------------------------------------------------------------------------------
    def _pki(self) -> None:
        d = self.root / "pki"
        d.mkdir(parents=True, exist_ok=True)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _cert(_name("keyward-e2e-kubernetes-ca"), ca_key, None, ca=True)
        _write(d / "ca.crt", _pem(ca), 0o644)
        _write(d / "ca.key", _pem(ca_key))
        srv_key = ec.generate_private_key(ec.SECP256R1())
        srv = _cert(_name("kube-apiserver"), srv_key, (ca, ca_key), server=True,
                    dns=("kubernetes", "kubernetes.default", "kubernetes.default.svc",
                         "kubernetes.default.svc.cluster.local", "localhost"),
                    ips=(BRIDGE_IP, "127.0.0.1", "10.96.0.1"))
        _write(d / "apiserver.crt", _pem(srv), 0o644)
        _write(d / "apiserver.key", _pem(srv_key))
        sa = rsa.generate_private_key(65537, 2048)
        _write(d / "sa.key", _pem(sa))
        _write(d / "sa.pub", sa.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo), 0o644)
        for who, cn, org in (("admin", "kubernetes-admin", "system:masters"),
                             ("controller-manager", "system:kube-controller-manager", None),
                             ("scheduler", "system:kube-scheduler", None),
                             ("kwok", "kwok-controller", "system:masters")):
            k = ec.generate_private_key(ec.SECP256R1())
            c = _cert(_name(cn, org), k, (ca, ca_key))
            _write(d / f"{who}.crt", _pem(c), 0o644)
            _write(d / f"{who}.key", _pem(k))
            self._kubeconfig(who)

    def _kubeconfig(self, who: str) -> Path:
        d = self.root / "pki"
        cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "e2e",
               "clusters": [{"name": "e2e", "cluster": {"server": self.server,
                                                         "certificate-authority": str(d / "ca.crt")}}],
               "users": [{"name": who, "user": {"client-certificate": str(d / f"{who}.crt"),
                                                "client-key": str(d / f"{who}.key")}}],
               "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": who}}]}
        return _write(self.root / f"{who}.kubeconfig", json.dumps(cfg).encode())

    # -- processes -------------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.log(name), "ab")  # noqa: SIM115 - the child owns it
        self.procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.root,
                                            start_new_session=True)

    def _alive(self, name: str) -> None:
        p = self.procs[name]
        if p.poll() is not None:
            tail = self.log(name).read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{name} exited with {p.returncode}:\n{tail}")

    def start(self) -> None:
        b = bin_dir()
        missing = [n for n in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok",
                               "kwok-stages.yaml")
                   if not (b / n).exists()]
        if missing:
            raise RuntimeError(f"missing {', '.join(missing)} in {b}: run scripts/kube-bins.sh (make e2e does)")
        self.root.mkdir(parents=True, exist_ok=True)
        _network()
        self._pki()
        d = self.root / "pki"
        self._spawn("etcd", [str(b / "etcd"), "--data-dir", str(self.root / "etcd"), "--unsafe-no-fsync",
                             "--listen-client-urls", "http://127.0.0.1:2379",
                             "--advertise-client-urls", "http://127.0.0.1:2379",
                             "--listen-peer-urls", "http://127.0.0.1:2380",
                             "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                             "--initial-cluster", "default=http://127.0.0.1:2380", "--log-level", "warn"])
        # PodSecurity enforces `restricted` in every namespace that does not say otherwise (a hardened
        # cluster's default), so `helm install --create-namespace` lands in a restricted namespace.
        admission = _write(self.root / "admission.json", json.dumps({
            "apiVersion": "apiserver.config.k8s.io/v1", "kind": "AdmissionConfiguration",
            "plugins": [{"name": "PodSecurity", "configuration": {
                "apiVersion": "pod-security.admission.config.k8s.io/v1", "kind": "PodSecurityConfiguration",
                "defaults": {"enforce": "restricted", "enforce-version": "latest",
                             "warn": "restricted", "warn-version": "latest"},
                "exemptions": {"namespaces": ["kube-system"]}}}]}).encode(), 0o644)
        self._spawn("kube-apiserver", [
            str(b / "kube-apiserver"), "--etcd-servers=http://127.0.0.1:2379",
            f"--bind-address={BRIDGE_IP}", f"--advertise-address={BRIDGE_IP}", f"--secure-port={API_PORT}",
            f"--tls-cert-file={d / 'apiserver.crt'}", f"--tls-private-key-file={d / 'apiserver.key'}",
            f"--client-ca-file={d / 'ca.crt'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={d / 'sa.pub'}", f"--service-account-signing-key-file={d / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--authorization-mode=Node,RBAC",
            # The default admission chain (PodSecurity, ServiceAccount, ...) plus the owner-reference check.
            "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
            f"--admission-control-config-file={admission}",
            "--allow-privileged=false", "--event-ttl=1h", "--v=1"])
        self.wait_api()
        self._spawn("kube-controller-manager", [
            str(b / "kube-controller-manager"), f"--kubeconfig={self.root / 'controller-manager.kubeconfig'}",
            f"--authentication-kubeconfig={self.root / 'controller-manager.kubeconfig'}",
            f"--authorization-kubeconfig={self.root / 'controller-manager.kubeconfig'}",
            f"--service-account-private-key-file={d / 'sa.key'}", f"--root-ca-file={d / 'ca.crt'}",
            "--use-service-account-credentials", "--leader-elect=false", "--bind-address=127.0.0.1",
            "--secure-port=10257", f"--cluster-cidr={POD_CIDR}", f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-node-route-controller",
            "--concurrent-gc-syncs=5", "--v=1"])
        self._spawn("kube-scheduler", [
            str(b / "kube-scheduler"), f"--kubeconfig={self.root / 'scheduler.kubeconfig'}",
            f"--authentication-kubeconfig={self.root / 'scheduler.kubeconfig'}",
            f"--authorization-kubeconfig={self.root / 'scheduler.kubeconfig'}",
            "--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=10259", "--v=1"])
        self._spawn("kwok", [
            str(b / "kwok"), f"--kubeconfig={self.root / 'kwok.kubeconfig'}",
            "--manage-all-nodes=false", "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            f"--config={self._stages(b / 'kwok-stages.yaml')}",
            f"--cidr={POD_CIDR}", f"--node-ip={BRIDGE_IP}", "--server-address=127.0.0.1:10247",
            "--node-lease-duration-seconds=40"])
        _write(self.kubeconfig, self._kubeconfig("admin").read_bytes())
        self.wait(self.token_controller_ran, 60, "the default ServiceAccount")

    def _stages(self, src: Path) -> Path:
        """kwok's stages, but a pod of ours turns Running *not* Ready: its readiness is the
        kubelet stand-in's, from its real readiness probe (kwok's pod-ready would call it Ready at
        once, so `helm install --wait` would return before anything could serve); and its deletion
        is the stand-in's too (graceful)."""
        import yaml  # dev dependency, as the chart tests use

        ours = {"key": '.metadata.labels["app.kubernetes.io/name"]', "operator": "In", "values": ["keyward"]}
        docs = [d for d in yaml.safe_load_all(src.read_text()) if d]
        out = []
        for d in docs:
            if d["metadata"]["name"] == "pod-ready":
                running = json.loads(json.dumps(d))
                running["metadata"]["name"] = "pod-running-unready"
                running["spec"]["selector"]["matchExpressions"].append(ours)
                t = running["spec"]["next"]["statusTemplate"]
                for cond in ("Ready", "ContainersReady"):
                    t, n = re.subn(rf'status: "True"(\n\s*)type: {cond}\n', rf'status: "False"\1type: {cond}\n', t)
                    assert n == 1, f"kwok's pod-ready stage changed: {cond}"
                running["spec"]["next"]["statusTemplate"] = t.replace("ready: true", "ready: false")
                d["spec"]["selector"]["matchExpressions"].append({**ours, "operator": "NotIn"})
                out.append(running)
            if d["metadata"]["name"] == "pod-delete":
                # Our pods end as the kubelet ends them (SIGTERM, grace period, then the final delete):
                # kwok would delete them at once, and with them their bound ServiceAccount tokens.
                d["spec"]["selector"]["matchExpressions"].append({**ours, "operator": "NotIn"})
            out.append(d)
        return _write(self.root / "kwok-stages.yaml", yaml.safe_dump_all(out).encode(), 0o644)

    def wait_api(self, timeout: float = 90) -> None:
        self.wait(lambda: self._healthy(), timeout, "the API server's /readyz",
                  check=("etcd", "kube-apiserver"))

    def _healthy(self) -> bool:
        try:
            return self.request("GET", "/readyz", raw=True) == b"ok"
        except (OSError, urllib.error.URLError, RuntimeError):
            return False

    def token_controller_ran(self) -> bool:
        """The controller-manager is at work once the default namespace has its ServiceAccount."""
        return self.request("GET", "/api/v1/namespaces/default/serviceaccounts/default") is not None

    def wait(self, pred: Any, timeout: float, what: str, check: tuple[str, ...] | None = None) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            for n in check if check is not None else tuple(self.procs):
                self._alive(n)
            v = pred()
            if v:
                return v
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
            time.sleep(0.2)

    # -- a minimal admin client (the tests use kubectl and helm) ----------------------------------------
    def _ssl(self) -> ssl.SSLContext:
        d = self.root / "pki"
        ctx = ssl.create_default_context(cafile=str(d / "ca.crt"))
        ctx.load_cert_chain(str(d / "admin.crt"), str(d / "admin.key"))
        return ctx

    def request(self, method: str, path: str, body: Any = None, *, raw: bool = False,
                ctype: str = "application/json") -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method,
                                     headers={"Content-Type": ctype} if data else {})
        try:
            with urllib.request.urlopen(req, context=self._ssl(), timeout=15) as r:
                out = r.read()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise RuntimeError(f"{method} {path}: {e.code} {e.read()[:500]!r}") from e
        return out if raw else json.loads(out or b"null")

    def stop(self) -> None:
        for name in ("kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            p = self.procs.pop(name, None)
            if p is None:
                continue
            with _suppress():
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with _suppress():
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=15)


@contextmanager
def _suppress() -> Iterator[None]:
    with suppress(ProcessLookupError, PermissionError):
        yield


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def _network() -> None:
    """The run's namespace: loopback up and the bridge pods attach to (idempotent)."""
    _sh("ip", "link", "set", "lo", "up")
    if _sh("ip", "link", "show", BRIDGE, check=False).returncode != 0:
        _sh("ip", "link", "add", BRIDGE, "type", "bridge")
        _sh("ip", "addr", "add", f"{BRIDGE_IP}/16", "dev", BRIDGE)
        _sh("ip", "link", "set", BRIDGE, "up")


NETNS = "keyward-e2e"
LOCK = Path("/run/keyward-e2e.lock")
MOUNTPOINTS = Path("/run/keyward-e2e-mountpoints")
"""Folders the kubelet stand-in made on the host as mount points, one a line: removed after the run."""


def _kill_tagged(tag: str) -> None:
    """Whatever happened to the test runner (even SIGKILL), no process of this run outlives it: every
    one (control plane, pods) carries KEYWARD_E2E_RUN=<tag> in its environment."""
    needle = f"KEYWARD_E2E_RUN={tag}".encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                os.kill(int(d.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def in_netns() -> bool:
    return os.environ.get("KEYWARD_E2E_NETNS") == NETNS


def run(argv: list[str]) -> int:
    """Run ``argv`` (the test runner) inside a fresh network namespace made for this run,
    then delete the namespace and every pod namespace made under it, whatever happened."""
    if os.geteuid() != 0:
        print("make e2e needs root: network namespaces for the pods (CI runs as root)", file=sys.stderr)
        return 2
    # SIGTERM (CI's timeout, a person's kill) runs the cleanup below like any other end.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    lock = open(LOCK, "w")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("another make e2e is running on this machine; wait for it to end", file=sys.stderr)
        return 2
    _sh("ip", "netns", "del", NETNS, check=False)  # a previous run killed before its cleanup
    _sh("ip", "netns", "add", NETNS)
    tag = f"{os.getpid()}-{time.time_ns()}"
    before = set(Path("/dev/shm").glob("keyward-e2e-*"))
    try:
        env = {**os.environ, "KEYWARD_E2E_NETNS": NETNS, "KEYWARD_E2E_RUN": tag}
        return subprocess.call(["ip", "netns", "exec", NETNS, *argv], env=env)
    finally:
        _kill_tagged(tag)
        for d in Path("/etc/netns").glob("kwp-*"):
            shutil.rmtree(d, ignore_errors=True)
        if MOUNTPOINTS.exists():
            for line in reversed(MOUNTPOINTS.read_text().splitlines()):
                with contextlib.suppress(OSError):
                    Path(line).rmdir()  # only if empty: never anything a pod did not make
            MOUNTPOINTS.unlink()
        if not os.environ.get("KEYWARD_E2E_KEEP"):
            for d in set(Path("/dev/shm").glob("keyward-e2e-*")) - before:
                shutil.rmtree(d, ignore_errors=True)
        for ns in _sh("ip", "netns", "list", check=False).stdout.split("\n"):
            name = ns.split(" ")[0]
            if name == NETNS or name.startswith("kwp-"):
                _sh("ip", "netns", "del", name, check=False)
        shutil.rmtree("/etc/netns/" + NETNS, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "run":
        args = sys.argv[2:]
        sys.exit(run(args[1:] if args[0] == "--" else args))
    print("usage: python -m tests.e2e.cluster run -- COMMAND...", file=sys.stderr)
    sys.exit(2)
