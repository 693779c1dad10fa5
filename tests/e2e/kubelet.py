"""The kubelet's part, for the pods that must really run: the CA, Postgres, the operator, the ZENs.

kwok plays every node: it binds pods, gives them an IP and marks them
Running and Ready. For pods whose image is one of ours (or the official
postgres image), this runner does what a kubelet and a container runtime
would, from the pod spec as the API server stored it:

* a network namespace per pod with the IP kwok gave it, on the run's bridge;
  ``/etc/hosts`` in it names every Service and headless-Service pod of the
  cluster (the cluster DNS stand-in) and ``kubernetes.default.svc``;
* volumes as the kubelet writes them: Secret and ConfigMap items with their
  ``defaultMode``/``mode``, group-owned by ``fsGroup`` with group read added
  (what makes a 0400 Secret file 0440 in a pod), memory emptyDirs, the
  projected ServiceAccount token (a real TokenRequest bound to the pod), and
  PersistentVolumeClaims (a local provisioner binds them to host folders);
* a private mount namespace with each volume at its mountPath, ``/``
  read-only when ``readOnlyRootFilesystem``, and an /etc/passwd with the
  image's users; then the container's command (the image's ENTRYPOINT from
  our Dockerfiles when the pod gives none, ``args`` appended) as
  ``runAsUser``/``runAsGroup`` with ``fsGroup`` as a supplementary group and
  no new privileges;
* the readiness probe (gRPC, TCP, exec, HTTP) run against the pod, its
  result written to the pod's Ready condition; restartPolicy Always.

What differs from a real node, and only that: programs come from this
checkout's virtualenv instead of an image (the images' ENTRYPOINTs are read
from docker/*.Dockerfile), and the official postgres image's
docker-entrypoint.sh is ``tests/e2e/image/docker-entrypoint.sh``, a stand-in
doing what the image's does for our chart (initdb with
POSTGRES_PASSWORD_FILE, the initdb scripts, then postgres).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.e2e.cluster import API_PORT, BRIDGE, BRIDGE_IP, MOUNTPOINTS, ROOT, Cluster

VENV_BIN = ROOT / ".venv" / "bin"
SRC_STAGE = Path("/run/keyward-e2e-src")
"""Where a pod's mount namespace keeps this checkout while its volumes are mounted."""
IMAGE_DIR = Path(__file__).parent / "image"
PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), Path("/usr/bin"))
PASSWD_EXTRA = "postgres:x:999:999:postgres:/var/lib/postgresql:/bin/sh\nkeyward:x:10001:10001::/nonexistent:/usr/sbin/nologin\n"
GROUP_EXTRA = "postgres:x:999:\nkeyward:x:10001:\n"
Obj = dict[str, Any]


def entrypoint(image: str) -> list[str] | None:
    """The image's ENTRYPOINT, from our Dockerfiles; the postgres image's is its entrypoint script."""
    repo = image.rsplit(":", 1)[0].rsplit("/", 2)
    if repo[-1] == "postgres":
        return ["docker-entrypoint.sh"]
    if len(repo) >= 2 and repo[-2] == "keyward":
        df = ROOT / "docker" / f"{repo[-1]}.Dockerfile"
        if df.exists():
            for line in df.read_text().splitlines():
                if line.startswith("ENTRYPOINT"):
                    return list(json.loads(line.removeprefix("ENTRYPOINT")))
    return None


def _repo(image: str) -> str:
    """"docker.io/library/postgres:16" -> "postgres"; "keyward/ca:0.1.0" -> "keyward/ca"."""
    repo = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
    parts = repo.split("/")
    return "/".join(parts[-2:]) if len(parts) >= 2 and parts[-2] == "keyward" else parts[-1]


def _local(argv: list[str]) -> list[str]:
    """An image's program, here, as the pod sees this checkout (at SRC_STAGE): the virtualenv's python;
    its console scripts (keyward, kopf) run by that python (their shebang names the checkout's own
    path, which the pod's user may not reach); anything else from PATH."""
    venv = SRC_STAGE / ".venv" / "bin"
    if argv[0] in ("python", "python3"):
        return [str(venv / "python"), *argv[1:]]
    if "/" not in argv[0] and (VENV_BIN / argv[0]).exists():
        return [str(venv / "python"), str(venv / argv[0]), *argv[1:]]
    return argv


@dataclass
class Running:
    uid: str
    ns: str
    name: str
    netns: str
    ip: str
    pod: Obj
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    ready: bool | None = None
    last_probe: float = 0.0
    log: Path = field(default_factory=Path)
    hosts: str = ""
    """What its /etc/hosts says now (each pod's is written when it differs: a new pod gets it at once)."""


class Kubelet:
    """Runs our pods for real; ``images`` limits which (e.g. {"keyward/ca", "postgres"})."""

    def __init__(self, cluster: Cluster, root: Path, namespaces: set[str] | None = None) -> None:
        self.cluster, self.root = cluster, root
        self.namespaces = namespaces
        self.pods: dict[str, Running] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._made_dirs: list[Path] = []
        self.errors: list[str] = []
        self._terminating: set[str] = set()
        self.hold: set[str] = set()
        """Image names (e.g. "postgres") whose pods are not started yet: a test orders starts."""
        self.paused: set[str] = set()
        """Pod names whose readiness the runner leaves alone (a test sets it through the API)."""

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        self._thread = threading.Thread(target=self._loop, name="kubelet", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)
        for r in list(self.pods.values()):
            self._kill(r)
        for d in reversed(self._made_dirs):
            with contextlib.suppress(OSError):
                d.rmdir()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception as e:  # noqa: BLE001 - keep running; the tests read .errors
                self.errors.append(repr(e))
            self._stop.wait(0.3)

    # -- one pass ---------------------------------------------------------------------------------------
    def sync(self) -> None:
        pods = (self.cluster.request("GET", "/api/v1/pods") or {}).get("items", [])
        self._provision()
        seen = set()
        for p in pods:
            meta, spec, status = p["metadata"], p.get("spec") or {}, p.get("status") or {}
            if self.namespaces is not None and meta["namespace"] not in self.namespaces:
                continue
            uid = meta["uid"]
            if meta.get("deletionTimestamp"):
                r = self.pods.pop(uid, None)
                if uid not in self._terminating and (r is not None or self._ours(p)):
                    self._terminating.add(uid)
                    # Graceful deletion, as the kubelet does it: SIGTERM, up to the grace period, then the
                    # final delete (the pod, and with it its bound ServiceAccount token, lives until then).
                    threading.Thread(target=self._terminate, args=(r, p), daemon=True).start()
                continue
            if not spec.get("nodeName") or not status.get("podIP"):
                continue
            if not self._ours(p):
                continue
            seen.add(uid)
            if uid not in self.pods:
                self.pods[uid] = self._setup(p)
        for uid in [u for u in self.pods if u not in seen]:  # gone without a graceful deletion
            threading.Thread(target=self._kill, args=(self.pods.pop(uid),), daemon=True).start()
        self._write_hosts()
        now = time.monotonic()
        for r in self.pods.values():
            if r.proc is None and any(_repo(c["image"]) in self.hold for c in r.pod["spec"]["containers"]):
                continue
            if (r.proc is None or r.proc.poll() is not None) and now >= r.next_start:
                if r.proc is not None:
                    r.restarts += 1
                    self._set_ready(r, False)
                r.next_start = now + min(10.0, 0.5 * 2 ** r.restarts)
                self._launch(r)
            if now - r.last_probe >= 1.0:
                r.last_probe = now
                self._probe(r)

    @staticmethod
    def _ours(p: Obj) -> bool:
        return all(entrypoint(c["image"]) is not None for c in (p.get("spec") or {}).get("containers", []))

    def _terminate(self, r: Running | None, p: Obj) -> None:
        if r is not None:
            self._kill(r)
        meta = p["metadata"]
        try:
            self.cluster.request("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                                 {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                                  "preconditions": {"uid": meta["uid"]}})
        except RuntimeError as e:
            if "409" not in str(e):  # already replaced: nothing to do
                self.errors.append(str(e))

    # -- storage: a local provisioner ------------------------------------------------------------------
    def _provision(self) -> None:
        """Bind each claim of the default class, once the scheduler picked its node, to a host folder."""
        pvcs = (self.cluster.request("GET", "/api/v1/persistentvolumeclaims") or {}).get("items", [])
        for c in pvcs:
            m = c["metadata"]
            if (c.get("spec") or {}).get("volumeName") or \
                    "volume.kubernetes.io/selected-node" not in (m.get("annotations") or {}):
                continue
            name = f"pv-{m['uid']}"
            d = self.root / "pv" / name
            d.mkdir(parents=True, exist_ok=True)
            if self.cluster.request("GET", f"/api/v1/persistentvolumes/{name}") is not None:
                continue
            self.cluster.request("POST", "/api/v1/persistentvolumes", {
                "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
                "spec": {"capacity": {"storage": c["spec"]["resources"]["requests"]["storage"]},
                         "accessModes": c["spec"]["accessModes"], "persistentVolumeReclaimPolicy": "Delete",
                         "storageClassName": c["spec"].get("storageClassName") or "standard",
                         "hostPath": {"path": str(d), "type": "DirectoryOrCreate"},
                         "claimRef": {"namespace": m["namespace"], "name": m["name"], "uid": m["uid"]}}})

    def _claim_dir(self, ns: str, claim: str) -> Path:
        c = self.cluster.request("GET", f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{claim}")
        if c is None or not (c.get("spec") or {}).get("volumeName"):
            raise RuntimeError(f"claim {ns}/{claim} is not bound")
        pv = self.cluster.request("GET", f"/api/v1/persistentvolumes/{c['spec']['volumeName']}")
        return Path(pv["spec"]["hostPath"]["path"])

    # -- a pod's sandbox ---------------------------------------------------------------------------------
    def _setup(self, p: Obj) -> Running:
        meta, ip = p["metadata"], p["status"]["podIP"]
        uid = meta["uid"]
        r = Running(uid=uid, ns=meta["namespace"], name=meta["name"], netns=f"kwp-{uid[:8]}", ip=ip, pod=p,
                    dir=self.root / "pods" / f"{meta['namespace']}_{meta['name']}_{uid[:8]}")
        r.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(r.dir, 0o755)
        r.log = r.dir / "container.log"
        veth = f"kwv{uid[:8]}"
        for argv in (["ip", "netns", "add", r.netns],
                     ["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", r.netns],
                     ["ip", "link", "set", veth, "master", BRIDGE, "up"],
                     ["ip", "-n", r.netns, "addr", "add", f"{ip}/16", "dev", "eth0"],
                     ["ip", "-n", r.netns, "link", "set", "eth0", "up"],
                     ["ip", "-n", r.netns, "link", "set", "lo", "up"],
                     ["ip", "-n", r.netns, "route", "add", "default", "via", BRIDGE_IP]):
            subprocess.run(argv, check=True, capture_output=True)
        etc = Path("/etc/netns") / r.netns
        etc.mkdir(parents=True, exist_ok=True)
        # What the kubelet writes for ClusterFirst (the search path makes "keyward-ca" a Service name);
        # no nameserver: the names are in /etc/hosts, the cluster DNS stand-in.
        (etc / "resolv.conf").write_text(f"search {r.ns}.svc.cluster.local svc.cluster.local cluster.local\n"
                                         "options ndots:5 attempts:1 timeout:1\n")
        (etc / "hosts").write_text("")
        passwd = r.dir / "passwd"
        passwd.write_text(Path("/etc/passwd").read_text() + PASSWD_EXTRA)
        group = r.dir / "group"
        group.write_text(Path("/etc/group").read_text() + GROUP_EXTRA)
        return r

    def _volumes(self, r: Running, sc: Obj) -> dict[str, Path]:
        """Write each volume as the kubelet would; return name -> host folder."""
        spec, ns = r.pod["spec"], r.ns
        fs_group = sc.get("fsGroup")
        out: dict[str, Path] = {}
        vols = list(spec.get("volumes") or [])
        sa_token = spec.get("automountServiceAccountToken", True)
        if sa_token and not any(v["name"].startswith("kube-api-access") for v in vols):
            sa = self.cluster.request("GET", f"/api/v1/namespaces/{ns}/serviceaccounts/"
                                             f"{spec.get('serviceAccountName', 'default')}") or {}
            if sa.get("automountServiceAccountToken", True) is not False:
                vols.append({"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {}}]}})
        for v in vols:
            d = r.dir / "volumes" / v["name"]
            if "persistentVolumeClaim" in v:
                out[v["name"]] = self._claim_dir(ns, v["persistentVolumeClaim"]["claimName"])
                self._own(out[v["name"]], fs_group, recursive_dirs_only=True)
                continue
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            out[v["name"]] = d
            if "emptyDir" in v:
                os.chmod(d, 0o777)  # the kubelet's emptyDir mode
                self._own(d, fs_group)
            elif "secret" in v or "configMap" in v:
                kind = "secret" if "secret" in v else "configMap"
                src = v[kind]
                name = src.get("secretName") if kind == "secret" else src.get("name")
                obj = self.cluster.request("GET", f"/api/v1/namespaces/{ns}/{'secrets' if kind == 'secret' else 'configmaps'}/{name}")
                if obj is None:
                    if src.get("optional"):
                        continue
                    raise RuntimeError(f"{kind} {ns}/{name} of pod {r.name} not found")
                data = {k: base64.b64decode(x) for k, x in (obj.get("data") or {}).items()} if kind == "secret" \
                    else {k: x.encode() for k, x in (obj.get("data") or {}).items()}
                items = src.get("items") or [{"key": k, "path": k} for k in data]
                mode = src.get("defaultMode", 0o644)
                for it in items:
                    f = d / it["path"]
                    f.parent.mkdir(parents=True, exist_ok=True)
                    f.write_bytes(data[it["key"]])
                    self._file_mode(f, it.get("mode", mode), fs_group)
                os.chmod(d, 0o755 if fs_group is None else 0o2755)
                self._own(d, fs_group)
            elif "projected" in v:
                for s in v["projected"]["sources"]:
                    if "serviceAccountToken" in s:
                        tok = self.cluster.request(
                            "POST", f"/api/v1/namespaces/{ns}/serviceaccounts/"
                                    f"{spec.get('serviceAccountName', 'default')}/token",
                            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                             "spec": {"expirationSeconds": 3607, "boundObjectRef": {
                                 "apiVersion": "v1", "kind": "Pod", "name": r.name, "uid": r.uid}}})
                        (d / "token").write_text(tok["status"]["token"])
                        (d / "ca.crt").write_bytes((self.cluster.root / "pki" / "ca.crt").read_bytes())
                        (d / "namespace").write_text(ns)
                        for f in d.iterdir():
                            self._file_mode(f, 0o644, fs_group)
                        self._own(d, fs_group)
            else:
                raise RuntimeError(f"volume kind of {v['name']} not supported by the e2e kubelet")
        return out

    @staticmethod
    def _file_mode(f: Path, mode: int, fs_group: int | None) -> None:
        if fs_group is not None:
            os.chown(f, 0, fs_group)
            mode |= 0o440  # the kubelet's read-only ownership mask: group read added
        os.chmod(f, mode)

    @staticmethod
    def _own(d: Path, fs_group: int | None, recursive_dirs_only: bool = False) -> None:
        if fs_group is None:
            return
        os.chown(d, 0 if not recursive_dirs_only else os.stat(d).st_uid, fs_group)
        os.chmod(d, os.stat(d).st_mode | 0o2070)

    def _launch(self, r: Running) -> None:
        spec = r.pod["spec"]
        c = spec["containers"][0]  # every pod of ours has one container
        psc = spec.get("securityContext") or {}
        csc = c.get("securityContext") or {}
        vols = self._volumes(r, psc)
        env = self._env(r, c)
        argv = list(c.get("command") or entrypoint(c["image"]) or []) + list(c.get("args") or [])
        argv = [_expand(a, env) for a in argv]
        argv = _local(argv)
        uid = csc.get("runAsUser", psc.get("runAsUser", 0))
        gid = csc.get("runAsGroup", psc.get("runAsGroup", uid))
        groups = [g for g in [psc.get("fsGroup"), *psc.get("supplementalGroups", [])] if g is not None]
        # This checkout (the "image"'s programs) is seen by the pod at SRC_STAGE, bound before the
        # volumes: a clone under /tmp would vanish under a /tmp emptyDir, and one under /root is out
        # of reach of the pod's user (/root is 0700).
        stage = SRC_STAGE
        self._mkdirs(stage)
        lines = ["set -e", f"mount --bind {shlex.quote(str(ROOT))} {stage}"]
        for m in c.get("volumeMounts") or []:
            if m["name"] not in vols:
                continue
            target = Path(m["mountPath"])
            if not target.exists():
                self._mkdirs(target)
            lines.append(f"mount --bind {shlex.quote(str(vols[m['name']]))} {shlex.quote(str(target))}")
            if m.get("readOnly"):
                lines.append(f"mount -o remount,bind,ro {shlex.quote(str(target))}")
        lines.append(f"mount --bind {shlex.quote(str(r.dir / 'passwd'))} /etc/passwd")
        lines.append(f"mount --bind {shlex.quote(str(r.dir / 'group'))} /etc/group")
        sa = Path("/var/run/secrets/kubernetes.io/serviceaccount")
        if "kube-api-access" in vols:
            self._mkdirs(sa)
            lines.append(f"mount --bind {shlex.quote(str(vols['kube-api-access']))} {sa}")
        if csc.get("readOnlyRootFilesystem"):
            lines.append("mount -o remount,bind,ro /")  # strict: a pod that could write there must not start
        priv = ["setpriv", f"--reuid={uid}", f"--regid={gid}",
                f"--groups={','.join(str(g) for g in groups)}" if groups else "--clear-groups"]
        if csc.get("allowPrivilegeEscalation") is False:
            priv.append("--no-new-privs")
        if "ALL" in ((csc.get("capabilities") or {}).get("drop") or []):
            priv += ["--inh-caps=-all", "--bounding-set=-all"]
        lines.append("cd /tmp 2>/dev/null || cd /")
        lines.append("exec " + " ".join(shlex.quote(a) for a in [*priv, "--", *argv]))
        script = r.dir / "start.sh"
        script.write_text("\n".join(lines) + "\n")
        out = open(r.log, "ab")  # noqa: SIM115 - the child owns it
        out.write(f"--- start {time.strftime('%H:%M:%S')} (restart {r.restarts}): {argv}\n".encode())
        out.flush()
        r.proc = subprocess.Popen(["ip", "netns", "exec", r.netns, "sh", str(script)], env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)

    def _mkdirs(self, target: Path) -> None:
        missing = []
        p = target
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir()
            self._made_dirs.append(d)
            with open(MOUNTPOINTS, "a") as f:  # make e2e removes them even if this process is killed
                f.write(f"{d}\n")

    def _env(self, r: Running, c: Obj) -> dict[str, str]:
        staged_image = SRC_STAGE / IMAGE_DIR.relative_to(ROOT)
        path = ":".join([str(staged_image), str(SRC_STAGE / ".venv" / "bin"), str(PG_BIN), "/usr/local/bin", "/usr/bin", "/bin",
                         "/usr/sbin", "/sbin"])
        env = {"PATH": path, "HOSTNAME": r.pod["spec"].get("hostname") or r.name, "HOME": "/tmp",
               "KUBERNETES_SERVICE_HOST": BRIDGE_IP, "KUBERNETES_SERVICE_PORT": str(API_PORT),
               "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": str(SRC_STAGE)}  # our packages from the staged checkout (the editable install names ROOT)
        if os.environ.get("KEYWARD_E2E_RUN"):  # not the pod's: how make e2e finds what to stop, whatever happened
            env["KEYWARD_E2E_RUN"] = os.environ["KEYWARD_E2E_RUN"]
        for e in c.get("env") or []:
            if "value" in e:
                env[e["name"]] = _expand(str(e["value"]), env)
                continue
            src = e.get("valueFrom") or {}
            if "fieldRef" in src:
                fp = src["fieldRef"]["fieldPath"]
                env[e["name"]] = {"metadata.namespace": r.ns, "metadata.name": r.name, "status.podIP": r.ip,
                                  "spec.nodeName": r.pod["spec"].get("nodeName", "")}[fp]
            elif "secretKeyRef" in src:
                ref = src["secretKeyRef"]
                s = self.cluster.request("GET", f"/api/v1/namespaces/{r.ns}/secrets/{ref['name']}") or {}
                env[e["name"]] = base64.b64decode((s.get("data") or {})[ref["key"]]).decode()
        return env

    # -- probes -------------------------------------------------------------------------------------------
    def _probe(self, r: Running) -> None:
        c = r.pod["spec"]["containers"][0]
        probe = c.get("readinessProbe")
        running = r.proc is not None and r.proc.poll() is None
        ok = running and (probe is None or self._run_probe(r, c, probe))
        if r.name not in self.paused:
            self._set_ready(r, ok)

    def _port(self, c: Obj, port: Any) -> int:
        if isinstance(port, int):
            return port
        return int(next(p["containerPort"] for p in c.get("ports") or [] if p.get("name") == port))

    def _run_probe(self, r: Running, c: Obj, probe: Obj) -> bool:
        try:
            if "tcpSocket" in probe:
                with socket.create_connection((r.ip, self._port(c, probe["tcpSocket"]["port"])), timeout=1):
                    return True
            if "httpGet" in probe:
                g = probe["httpGet"]
                with urllib.request.urlopen(f"http://{r.ip}:{self._port(c, g['port'])}{g.get('path', '/')}",
                                            timeout=1) as resp:
                    return 200 <= resp.status < 400
            if "grpc" in probe:
                import grpc
                from grpc_health.v1 import health_pb2, health_pb2_grpc
                g = probe["grpc"]
                with grpc.insecure_channel(f"{r.ip}:{g['port']}") as ch:
                    resp = health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(service=g.get("service", "")), timeout=1)
                    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)
            if "exec" in probe:
                env = {"PATH": f"{PG_BIN}:/usr/bin:/bin"}
                return subprocess.run(["ip", "netns", "exec", r.netns, *probe["exec"]["command"]], env=env,
                                      capture_output=True, timeout=3).returncode == 0
        except (OSError, subprocess.TimeoutExpired, StopIteration):
            return False
        except Exception:  # noqa: BLE001 - a gRPC error is a failed probe
            return False
        return False

    def _set_ready(self, r: Running, ok: bool) -> None:
        if r.ready == ok:
            return
        s = "True" if ok else "False"
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            self.cluster.request(
                "PATCH", f"/api/v1/namespaces/{r.ns}/pods/{r.name}/status",
                {"status": {"conditions": [{"type": "Ready", "status": s, "lastTransitionTime": now},
                                           {"type": "ContainersReady", "status": s, "lastTransitionTime": now}]}},
                ctype="application/strategic-merge-patch+json")
            r.ready = ok
        except RuntimeError as e:
            self.errors.append(str(e))

    # -- cluster DNS stand-in -----------------------------------------------------------------------------
    def _write_hosts(self) -> None:
        slices = (self.cluster.request("GET", "/apis/discovery.k8s.io/v1/endpointslices") or {}).get("items", [])
        svcs = {(s["metadata"]["namespace"], s["metadata"]["name"]): s
                for s in (self.cluster.request("GET", "/api/v1/services") or {}).get("items", [])}
        lines = ["127.0.0.1 localhost", f"{BRIDGE_IP} kubernetes kubernetes.default kubernetes.default.svc "
                 "kubernetes.default.svc.cluster.local"]
        for sl in slices:
            ns = sl["metadata"]["namespace"]
            svc_name = (sl["metadata"].get("labels") or {}).get("kubernetes.io/service-name")
            svc = svcs.get((ns, svc_name or ""))
            if svc is None:
                continue
            publish = (svc.get("spec") or {}).get("publishNotReadyAddresses")
            names = [svc_name, f"{svc_name}.{ns}", f"{svc_name}.{ns}.svc", f"{svc_name}.{ns}.svc.cluster.local"]
            for ep in sl.get("endpoints") or []:
                ready = (ep.get("conditions") or {}).get("ready") is not False
                for ip in ep.get("addresses") or []:
                    if ep.get("hostname"):
                        lines.append(f"{ip} " + " ".join(f"{ep['hostname']}.{n}" for n in names))
                    if ready or publish:
                        lines.append(f"{ip} " + " ".join(names))
        text = "\n".join(lines) + "\n"
        for r in list(self.pods.values()):
            full = f"{r.ip} {r.pod['spec'].get('hostname') or r.name}\n" + text
            if r.hosts == full:
                continue
            f = Path("/etc/netns") / r.netns / "hosts"
            with open(f, "r+" if f.exists() else "w") as fh:  # in place: the pod's bind mount sees it
                fh.seek(0)
                fh.write(full)
                fh.truncate()
            r.hosts = full

    # -- teardown ----------------------------------------------------------------------------------------
    def _kill(self, r: Running) -> None:
        if r.proc is not None and r.proc.poll() is None:
            grace = int(r.pod["metadata"].get("deletionGracePeriodSeconds")
                        or r.pod["spec"].get("terminationGracePeriodSeconds", 30))
            try:
                os.killpg(r.proc.pid, signal.SIGTERM)
                r.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(r.proc.pid, signal.SIGKILL)
                r.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", r.netns], capture_output=True)
        shutil.rmtree(Path("/etc/netns") / r.netns, ignore_errors=True)

    def kill_pod_process(self, name: str, sig: int = signal.SIGKILL, *, down_for: float = 0.0) -> None:
        """A crash: the pod's process dies; restarted (restartPolicy Always) after ``down_for``
        seconds at the earliest, as when its node is lost for a while."""
        for r in list(self.pods.values()):
            if r.name == name and r.proc is not None:
                r.next_start = time.monotonic() + down_for
                os.killpg(r.proc.pid, sig)


def _expand(s: str, env: dict[str, str]) -> str:
    """$(VAR) as the kubelet expands it in command, args and env values."""
    for k, v in env.items():
        s = s.replace(f"$({k})", v)
    return s
