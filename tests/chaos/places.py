"""Where the campaign's servers live: each in a network namespace of its own, joined to ours by
a veth pair on one bridge (its link can be cut), with its files on a tmpfs of its own (its disk
can be filled).

Our namespace holds the bridge (``<subnet>.1``), the CA, the watch agent and the load; server
``i`` listens on ``<subnet>.<10+i>`` inside namespace ``kw<tag>n<i>``. Unix sockets are files, so
the harness still reaches every server over its socket while its link is down (the monitor
sees the roles during a cut). Needs root (ip netns, mount); everything is removed on teardown.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


def _ip(*args: str, ns: str = "") -> None:
    cmd = (["ip", "netns", "exec", ns, "ip"] if ns else ["ip"]) + list(args)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {p.stderr.strip()}")


@dataclass
class Places:
    roots: list[Path]
    """Each server's root folder (its tmpfs mount point)."""
    tmpfs_mb: int = 512
    tag: str = field(default_factory=lambda: f"{os.getpid() % 10000}")
    subnet: str = field(default_factory=lambda: f"10.77.{os.getpid() % 250}")
    ready: bool = False

    @property
    def bridge(self) -> str:
        return f"kwb{self.tag}"

    def ns(self, i: int) -> str:
        return f"kw{self.tag}n{i}"

    def host(self, i: int) -> str:
        return f"{self.subnet}.{10 + i}"

    def _inner(self, i: int) -> str:
        return f"kw{self.tag}i{i}"

    def setup(self) -> tuple[tuple[str, str], ...]:
        """Create it all; returns (host, netns) per server, for devstack.pg.PgCluster(places=...)."""
        self.teardown()  # a previous run killed before its teardown
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, root in enumerate(self.roots):
            outer, inner = f"kw{self.tag}o{i}", self._inner(i)
            _ip("netns", "add", self.ns(i))
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", self.ns(i))
            _ip("link", "set", outer, "master", self.bridge, "up")
            _ip("addr", "add", f"{self.host(i)}/24", "dev", inner, ns=self.ns(i))
            _ip("link", "set", inner, "up", ns=self.ns(i))
            _ip("link", "set", "lo", "up", ns=self.ns(i))
            root.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.tmpfs_mb}m,mode=0755", "tmpfs", str(root)],
                           check=True, capture_output=True, timeout=30)
        self.ready = True
        return tuple((self.host(i), self.ns(i)) for i in range(len(self.roots)))

    def cut(self, i: int) -> None:
        """Set server ``i``'s link down: nothing reaches it, nor leaves it (its processes run on)."""
        _ip("link", "set", self._inner(i), "down", ns=self.ns(i))

    def restore(self, i: int) -> None:
        _ip("link", "set", self._inner(i), "up", ns=self.ns(i))

    def filler(self, i: int) -> Path:
        return self.roots[i] / "filler"

    def fill(self, i: int) -> int:
        """Take every free byte of server ``i``'s tmpfs (root's file: the server cannot remove it).
        Returns the bytes taken."""
        st = os.statvfs(self.roots[i])
        size = st.f_bavail * st.f_frsize
        fd = os.open(self.filler(i), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:  # raced with the server's own writes: take what is left
                if e.errno != errno.ENOSPC:
                    raise
                while True:
                    try:
                        os.write(fd, bytes(1 << 16))
                    except OSError as e2:
                        if e2.errno == errno.ENOSPC:
                            break
                        raise
        finally:
            os.close(fd)
        return os.stat(self.filler(i)).st_size

    def free(self, i: int) -> None:
        self.filler(i).unlink(missing_ok=True)

    def used_mb(self, i: int) -> float:
        st = os.statvfs(self.roots[i])
        return (st.f_blocks - st.f_bfree) * st.f_frsize / 2**20

    def teardown(self) -> None:
        """Unmount and delete (after the servers are gone: a mount in use stays until then)."""
        for i, root in enumerate(self.roots):
            if os.path.ismount(root):
                subprocess.run(["umount", "-l", str(root)], capture_output=True, timeout=30)
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", self.ns(i))
            with contextlib.suppress(RuntimeError):
                _ip("link", "del", f"kw{self.tag}o{i}")
        with contextlib.suppress(RuntimeError):
            _ip("link", "del", self.bridge)
        self.ready = False
