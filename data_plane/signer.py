"""The org key's only home: a small signer process per org.

Python and the TLS library keep copies of key material that cannot be wiped
(object heaps, parser buffers). So the ZEN isolates instead: the org's
private key is opened into locked memory, written straight from that buffer
into a pipe to a fresh child process, and wiped. Only the child ever parses
the key; it turns core dumps off, locks the memory that holds the key (see
:func:`_lock_memory`), and signs leaf certificates on request. Dropping the
key (idle, revoked, rotated) ends the child: the kernel reclaims its pages
and nothing of the key is left in any ZEN process.

Protocol on the child's stdin/stdout: 4-byte big-endian length + JSON. The
first message is the raw DER (length-prefixed, not JSON) followed by the
intermediate certificate PEM.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import ctypes.util
import datetime as dt
import json
import logging
import os
import resource
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass

from common.hardening import no_core_dumps
from common.logs import setup
from data_plane import metrics
from keylib.securemem import LockedBuffer

MCL_CURRENT, MCL_FUTURE = 1, 2
CAP_IPC_LOCK = 14
MAX_KEY_DER = 1 << 16

log = logging.getLogger(__name__)


class SignerError(RuntimeError):
    """The signer process failed or refused a request."""


@dataclass(frozen=True)
class LeafRequest:
    """What a leaf certificate says; the signer adds issuer and signature."""

    common_name: str
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    public_key_der: bytes  # SubjectPublicKeyInfo of the ZEN's leaf key
    not_before: dt.datetime
    not_after: dt.datetime
    serial: int


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def _read_exact(fd: int, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            raise EOFError("pipe closed")
        out += chunk
    return bytes(out)


class MemoryNotLocked(SignerError):
    """KEYWARD_REQUIRE_MLOCK is set and the key's memory could not be locked: not opened."""


class Signer:
    """Parent side. Thread-safe; one request at a time per signer."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc
        self._lock = threading.Lock()
        #: The key's pages are locked in RAM (mlock), as the signer reported when it took the key.
        self.locked = False

    @property
    def pid(self) -> int:
        return self._proc.pid

    @classmethod
    def start(cls, der: LockedBuffer, intermediate_pem: str, *, require_lock: bool = False) -> Signer:
        """Start a signer holding ``der``'s key. ``der`` is not kept; wipe it after.

        ``require_lock`` (the ZEN's KEYWARD_REQUIRE_MLOCK): a signer that cannot lock the memory
        holding the key is stopped, and the key not opened (SignerError), instead of a warning."""
        proc = subprocess.Popen([sys.executable, "-m", "data_plane.signer"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, close_fds=True, env={"PYTHONPATH": os.pathsep.join(sys.path)})
        assert proc.stdin is not None and proc.stdout is not None
        fd = proc.stdin.fileno()
        os.write(fd, struct.pack(">I", der.size))
        view = der.view
        sent = 0
        while sent < der.size:  # straight from locked memory to the pipe: no Python copy
            sent += os.write(fd, view[sent:])
        os.write(fd, _frame(intermediate_pem.encode()))
        s = cls(proc)
        ready = s._recv()
        if ready.get("error"):
            s.stop()
            raise SignerError(f"signer refused the key: {ready['error']}")
        locked = bool(ready.get("locked"))
        s.locked = locked
        metrics.SIGNER_LOCKED.set(1 if locked else 0)
        if not locked:
            if require_lock:
                s.stop()
                raise MemoryNotLocked("the memory holding the key cannot be locked (RLIMIT_MEMLOCK too small): the key "
                                  "was not opened; raise the limit, or set KEYWARD_REQUIRE_MLOCK=false to accept "
                                  "that it could be swapped out")
            log.warning("signer %d: the memory holding the key is not locked (RLIMIT_MEMLOCK too small); "
                        "it could be swapped out on a node with swap", proc.pid)
        return s

    def _recv(self) -> dict[str, object]:
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        try:
            (n,) = struct.unpack(">I", _read_exact(fd, 4))
            return dict(json.loads(_read_exact(fd, n)))
        except (EOFError, ValueError) as e:
            raise SignerError(f"signer process {self._proc.pid} died") from e

    def sign(self, req: LeafRequest) -> bytes:
        msg = {"cn": req.common_name, "dns": list(req.dns_names), "ips": list(req.ip_addresses),
               "spki": base64.b64encode(req.public_key_der).decode(), "nb": req.not_before.isoformat(),
               "na": req.not_after.isoformat(), "serial": req.serial}
        with self._lock:
            if self._proc.poll() is not None:
                raise SignerError("signer process has ended")
            assert self._proc.stdin is not None
            os.write(self._proc.stdin.fileno(), _frame(json.dumps(msg).encode()))
            out = self._recv()
        if "error" in out:
            raise SignerError(str(out["error"]))
        return base64.b64decode(str(out["cert"]))

    def stop(self) -> None:
        """End the process (SIGKILL: nothing of it is worth a graceful exit)."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait(10)
        for f in (self._proc.stdin, self._proc.stdout):
            if f is not None:
                f.close()


# ------------------------------------------------------------------ child

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)


def _status(field: str) -> str:
    with open("/proc/self/status") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith(field + ":")), "")


def _heap() -> tuple[int, int] | None:
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith("[heap]"):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                return lo, hi
    return None


def _lock_memory() -> bool:
    """Lock what holds the key within RLIMIT_MEMLOCK; True when it is locked.

    Where locking has no limit (RLIMIT_MEMLOCK unlimited, or CAP_IPC_LOCK) the
    whole process is locked, now and later (``mlockall``). Otherwise, as in a
    pod without IPC_LOCK (PodSecurity ``restricted`` refuses it), ``MCL_FUTURE``
    would make every allocation past the limit fail, so only the heap is
    locked: OpenSSL keeps the parsed key (and the Montgomery contexts of its
    primes, made at the first signature) in malloc's main arena. Called after
    the key is parsed and after each signature, as the heap may grow; the DER
    itself arrives in a :class:`LockedBuffer`. When the heap does not fit in
    the limit nothing more is locked, and the parent logs it (Kubernetes nodes
    run without swap unless configured otherwise)."""
    global _all_locked
    if _all_locked:
        return True
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != hard:  # an unprivileged process may raise its soft limit to the hard one
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
            soft = hard
    if soft == resource.RLIM_INFINITY or int(_status("CapEff") or "0", 16) >> CAP_IPC_LOCK & 1:
        _all_locked = _libc.mlockall(MCL_CURRENT | MCL_FUTURE) == 0
        if _all_locked:
            return True
    heap = _heap()
    if heap is None:
        return False
    lo, hi = heap
    done = min(_heap_locked.get(lo, lo), hi)  # the heap may have shrunk (malloc trims it)
    if done < hi:
        if _libc.mlock(done, hi - done) != 0:  # the kernel enforces RLIMIT_MEMLOCK
            return False
        _heap_locked[lo] = hi
    return True


_all_locked = False
_heap_locked: dict[int, int] = {}
"""Start of the heap -> end of its locked part."""


def _child() -> None:
    no_core_dumps()
    # fd 2 is the ZEN's (its converting pipe): JSON lines, and a crash is its type and frames only,
    # never an exception's message (which could quote what the key parser saw).
    setup("WARNING", "keyward-signer", capture_stderr=False)
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    fin, fout = 0, 1

    def send(obj: dict[str, object]) -> None:
        os.write(fout, _frame(json.dumps(obj).encode()))

    (n,) = struct.unpack(">I", _read_exact(fin, 4))
    if not 0 < n <= MAX_KEY_DER:
        send({"error": "not a private key (length)"})
        return
    # Straight from the pipe into locked memory (one page: within any RLIMIT_MEMLOCK): no Python copy.
    der = LockedBuffer(n, require_lock=False)
    got = 0
    while got < n:
        k = os.readv(fin, [der.view[got:]])
        if not k:
            raise EOFError("pipe closed")
        got += k
    (m,) = struct.unpack(">I", _read_exact(fin, 4))
    issuer = x509.load_pem_x509_certificate(_read_exact(fin, m))
    try:
        key = serialization.load_der_private_key(der.view, None)
    except ValueError as e:
        send({"error": f"not a private key ({e.__class__.__name__})"})
        return
    finally:
        der.wipe()
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        send({"error": "unsupported key type"})
        return
    send({"ready": True, "locked": _lock_memory()})
    algo = hashes.SHA256()
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
    while True:
        try:
            (n,) = struct.unpack(">I", _read_exact(fin, 4))
        except EOFError:
            return
        try:
            r = json.loads(_read_exact(fin, n))
            pub = serialization.load_der_public_key(base64.b64decode(r["spki"]))
            sans: list[x509.GeneralName] = [x509.DNSName(d) for d in r["dns"]]
            sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in r["ips"]]
            b = (x509.CertificateBuilder()
                 .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, r["cn"][:64])]))
                 .issuer_name(issuer.subject).public_key(pub)  # type: ignore[arg-type]
                 .serial_number(int(r["serial"]))
                 .not_valid_before(dt.datetime.fromisoformat(r["nb"]))
                 .not_valid_after(dt.datetime.fromisoformat(r["na"]))
                 .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                 .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False),
                                critical=True)
                 .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                 .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                 .add_extension(aki, critical=False))
            cert = b.sign(key, algo)
            _lock_memory()  # the first signature adds the primes' Montgomery contexts to the heap
            send({"cert": base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()})
        except Exception as e:  # a bad request must not end the signer
            send({"error": f"cannot sign: {e.__class__.__name__}"})


if __name__ == "__main__":
    _child()
