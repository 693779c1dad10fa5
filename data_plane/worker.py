"""``python -m data_plane.worker CONTROL_FD LINES_FD LISTEN_FD...``: one worker of a ZEN with
KEYWARD_ZEN_WORKERS > 1 (started by data_plane.workers.Supervisor, never by hand).

It serves the inherited listening sockets with its own Proxy, Minter (leaf cache and leaf
keys), origin pool and TLS sessions, on its own event loop, configured by the same environment
as the supervisor. What is one per ZEN it asks the supervisor for over the control channel
(``RemoteKeys``): an org's key (its id and certificates: never the key itself, which stays in
the supervisor's signer process for that org), a leaf signed with it, an org's policy; and it
is told every policy change and every key gone. It exits when the supervisor does (the control
channel closes) or on SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from common import loops
from common.logs import setup
from data_plane import config
from data_plane.keys import OrgKey
from data_plane.signer import LeafRequest, SignerError
from data_plane.workers import Channel

TOUCH_EVERY = 1.0
"""Seconds between two ``touch`` of an org's key (what keeps the supervisor from dropping it idle)."""


class RemoteSigner:
    """The org's signer, in the supervisor: ``sign`` is called from the minter's thread."""

    def __init__(self, ch: Channel, loop: asyncio.AbstractEventLoop, org: str, key_id: str) -> None:
        self._ch, self._loop, self._org, self._key_id = ch, loop, org, key_id
        self.locked = True

    def sign(self, req: LeafRequest) -> bytes:
        try:
            der = asyncio.run_coroutine_threadsafe(self._ch.call("sign", self._org, self._key_id, req),
                                                   self._loop).result(30)
        except Exception as e:
            raise SignerError(f"the supervisor did not sign: {e}") from None
        return bytes(der)

    def stop(self) -> None:
        pass  # the supervisor's to end


class RemoteKeys:
    """What Proxy asks of keys.KeyManager (policies, signer_for, learn), answered by the supervisor."""

    def __init__(self, ch: Channel | None = None) -> None:
        self.ch: Channel | None = ch
        self.policies: dict[str, Any] = {}
        self.pac: list[str] = []
        self.ready = asyncio.Event()
        self._keys: dict[str, OrgKey] = {}
        self._touched: dict[str, float] = {}
        #: Called with the org whenever its key is gone (what was made with it goes too).
        self.on_key_gone: list[Callable[[str], None]] = []

    def on_push(self, kind: str, args: tuple[Any, ...]) -> None:
        if kind == "hello":
            self.policies.update(args[0])
            self.pac = list(args[1])
            self.ready.set()
        elif kind == "policy":
            org, policy = args
            if policy is None:
                self.policies.pop(org, None)
            else:
                self.policies[org] = policy
        elif kind == "gone":
            self._keys.pop(args[0], None)
            for f in self.on_key_gone:
                f(args[0])

    async def signer_for(self, org: str) -> OrgKey | None:
        assert self.ch is not None
        k = self._keys.get(org)
        if k is None:
            meta = await self.ch.call("key", org)
            if meta is None:
                return None
            key_id, version, cert_pem, chain_pem = meta
            signer = RemoteSigner(self.ch, asyncio.get_running_loop(), org, key_id)
            k = self._keys[org] = OrgKey(org, key_id, version, cert_pem, chain_pem, signer)  # type: ignore[arg-type]
            self._touched[org] = time.monotonic()
        elif time.monotonic() - self._touched.get(org, 0.0) > TOUCH_EVERY:
            self._touched[org] = time.monotonic()
            self.ch.push("touch", org)
        return k

    async def learn(self, org: str) -> Any:
        assert self.ch is not None
        if org in self.policies:
            return self.policies[org]
        return await self.ch.call("learn", org)


async def run(cfg: config.ZenConfig, control_fd: int, listen_fds: list[int]) -> None:
    from data_plane.mint import Minter
    from data_plane.origins import OriginPool, Sessions
    from data_plane.proxy import Proxy, origin_context

    keys = RemoteKeys()
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=control_fd))
    keys.ch = Channel(reader, writer, on_push=keys.on_push)
    channel = asyncio.create_task(keys.ch.run())
    await asyncio.wait_for(keys.ready.wait(), 30)
    minter = Minter(leaf_hours=cfg.leaf_hours, cache_size=cfg.leaf_cache_size)
    proxy = Proxy(keys, minter, origin_context(cfg.extra_roots_file),  # type: ignore[arg-type]
                  origin_h1_ctx=origin_context(cfg.extra_roots_file, ("http/1.1",)), resolve=dict(cfg.resolve),
                  pac_proxies=keys.pac, pool=OriginPool(max_idle=cfg.origin_pool, idle_seconds=cfg.origin_idle),
                  sessions=Sessions(seconds=cfg.origin_session_seconds))
    keys.on_key_gone += [minter.forget, proxy.dialer.forget]
    servers = [await asyncio.start_server(proxy.handle, sock=socket.socket(fileno=fd), limit=64 * 1024)
               for fd in listen_fds]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait([channel, stopped], return_when=asyncio.FIRST_COMPLETED)  # the supervisor gone, or told to
    for s in servers:
        s.close()
    proxy.dialer.pool.close()


def main(argv: list[str]) -> int:
    control_fd, lines_fd, listen_fds = int(argv[0]), int(argv[1]), [int(x) for x in argv[2:]]
    # fd 2 is the supervisor's converting pipe (for what is not a record); records go to its stderr.
    setup("INFO", "keyward-zen", capture_stderr=False, lines_fd=lines_fd if lines_fd >= 0 else None, queued=True)
    cfg = config.from_env()
    import logging

    logging.getLogger().setLevel(cfg.log_level)
    loops.run(run(cfg, control_fd, listen_fds), cfg.event_loop)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
