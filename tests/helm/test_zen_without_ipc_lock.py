"""ZEN pods run without IPC_LOCK (PodSecurity ``restricted`` admits no other
capability than NET_BIND_SERVICE), as a non-root uid under the container's
RLIMIT_MEMLOCK. The org-key signer must work there and still lock the memory
that holds the key, within the limit.

The signer child is started as it runs in a pod: uid 65534 with no
capability (when the tests run as root) and a small RLIMIT_MEMLOCK. Under
``mlockall(MCL_CURRENT | MCL_FUTURE)`` a limit below the process's size
locked nothing, and one above it made every later allocation past the limit
fail.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from data_plane.signer import LeafRequest, Signer
from keylib.securemem import from_bytes

ROOT = Path(__file__).resolve().parents[2]


def _vm_kib(code: str) -> int:
    out = subprocess.run([sys.executable, "-c", code + "\nprint(next(l.split()[1] for l in open('/proc/self/status') "
                          "if l.startswith('VmSize:')))"], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={"PYTHONPATH": os.pathsep.join(sys.path)}, timeout=60)
    return int(out.stdout.split()[-1])


def _reachable_by_others(path: Path) -> bool:
    return all(os.stat(d).st_mode & 0o001 for d in [path, *path.parents])


def _pod_like_python(tmp_path: Path, memlock_kib: int) -> str:
    """A python that runs as a pod's container would: non-root, no capability, RLIMIT_MEMLOCK as given."""
    drop = ""
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is needed to drop root for this test")
        # What limits mlock is the capability, not the uid: with no capability root is held to
        # RLIMIT_MEMLOCK too. Drop to uid 65534 where it can reach this checkout (a clone under
        # /root, 0700, it cannot), else stay uid 0 with every capability gone.
        user = "--reuid=65534 --regid=65534 --clear-groups " if _reachable_by_others(ROOT) else ""
        drop = f"{setpriv} {user}--inh-caps=-all --bounding-set=-all "
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nulimit -l {memlock_kib} || exit 97\nexec {drop}{sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def _org() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "org intermediate")])
    now = dt.datetime.now(dt.UTC)
    issuer = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
              .serial_number(1).not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(key, hashes.SHA256()))
    return key, issuer


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}


def _start_and_sign(python: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Signer, dict[str, str]]:
    key, issuer = _org()
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    monkeypatch.setattr(sys, "executable", python)  # Signer.start runs `sys.executable -m data_plane.signer`
    buf = from_bytes(der)
    try:
        signer = Signer.start(buf, issuer.public_bytes(serialization.Encoding.PEM).decode())
    finally:
        buf.wipe()
        monkeypatch.undo()
    now = dt.datetime.now(dt.UTC)
    spki = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    for serial in (1, 2):
        cert = x509.load_der_x509_certificate(signer.sign(LeafRequest(
            "shop.example", ("shop.example",), (), spki, now, now + dt.timedelta(hours=1), serial)))
        cert.verify_directly_issued_by(issuer)
    return signer, _status(signer.pid)


def test_signer_locks_the_key_within_the_containers_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 8 MiB: the usual container default (and the kernel's since 5.11); the hard limit if lower.
    hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    limit = 8192 if hard == resource.RLIM_INFINITY else min(8192, hard // 1024)
    if limit < 6 * 1024:
        pytest.skip(f"RLIMIT_MEMLOCK hard limit {hard} is below what a signer's heap needs")
    # The process is larger than the limit from its start: mlockall(MCL_CURRENT | ...) locked nothing.
    assert _vm_kib("import data_plane.signer") > limit
    signer, st = _start_and_sign(_pod_like_python(tmp_path, limit), monkeypatch)
    try:
        if os.geteuid() == 0:
            assert int(st["CapEff"], 16) == 0
            if _reachable_by_others(ROOT):
                assert st["Uid"].split()[0] == "65534"
        assert 0 < int(st["VmLck"].split()[0]) <= limit, "the heap holding the parsed key is locked, within the limit"
    finally:
        signer.stop()


def test_signer_works_under_a_tiny_limit_and_says_the_key_is_not_locked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="data_plane.signer"):
        signer, st = _start_and_sign(_pod_like_python(tmp_path, 64), monkeypatch)
    try:
        assert int(st["VmLck"].split()[0]) <= 64
        assert any("not locked" in r.getMessage() for r in caplog.records)
    finally:
        signer.stop()


def test_a_key_that_cannot_be_locked_is_not_opened_when_locking_is_required(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """KEYWARD_REQUIRE_MLOCK=true (the default) is honoured: under a 64 KiB limit the signer is stopped
    and the key not opened, with a message saying what to change (it used to start, unlocked)."""
    from data_plane import metrics
    from data_plane.signer import SignerError

    key, issuer = _org()
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    monkeypatch.setattr(sys, "executable", _pod_like_python(tmp_path, 64))
    buf = from_bytes(der)
    try:
        with pytest.raises(SignerError, match="cannot be locked.*KEYWARD_REQUIRE_MLOCK"):
            Signer.start(buf, issuer.public_bytes(serialization.Encoding.PEM).decode(), require_lock=True)
    finally:
        buf.wipe()
        monkeypatch.undo()
    assert metrics.SIGNER_LOCKED._value.get() == 0  # the state is in the metrics
