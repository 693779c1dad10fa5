"""Worker processes (KEYWARD_ZEN_WORKERS > 1): the ZEN's proxy on more than one core.

The ZEN's process becomes a supervisor: it binds the listening socket(s), keeps everything that
is one per ZEN (the CA client and its watch, the org keys and their signer processes, one per
org, the metrics and health endpoint) and starts ``workers`` processes (``data_plane.worker``),
which inherit the listening socket and each accept, decide, mint and relay on their own event
loop. A worker asks the supervisor over its control channel (a Unix socket pair: length-prefixed
pickles between processes of this program, nothing else holds either end):

* ``key`` (org): ``KeyManager.signer_for`` for an org a caller authenticated as: the key's
  id, version and certificates, never the key; ``learn`` (org): an org's policy;
* ``sign`` (org, key id, LeafRequest): a leaf signed by that org's signer, if that key is still
  the org's (a rotated-out key signs nothing more); ``touch`` (org): the key is in use;
* and is told (pushes) every policy as it changes and every org whose key is gone, so its leaf
  cache, leaf keys and origin connections go with it, as in a single-process ZEN.

Each worker counts in its own metrics; with workers, prometheus_client's multiprocess mode
(PROMETHEUS_MULTIPROC_DIR, set before it is imported) sums them for the supervisor's /metrics.
A worker that dies is started again; /healthz says how many run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from common import logs

log = logging.getLogger("keyward.zen")

LISTEN_BACKLOG = 100
"""asyncio.start_server's default."""

Handler = Callable[[str, tuple[Any, ...]], Awaitable[Any]]


class ChannelClosed(ConnectionError):
    """The other end of a control channel is gone."""


class Channel:
    """Requests with replies, and pushes, both ways over one stream (messages are tuples:
    (kind, id, *args); id 0 is a push; a reply is ("reply", id, ok, value))."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 handle: Handler | None = None, on_push: Callable[[str, tuple[Any, ...]], None] | None = None) -> None:
        self._reader, self._writer = reader, writer
        self._handle, self._on_push = handle, on_push
        self._next = 0
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def _send(self, msg: tuple[Any, ...]) -> None:
        if self._writer.is_closing():
            raise ChannelClosed("control channel closed")
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        self._writer.write(len(data).to_bytes(4, "big") + data)

    def push(self, kind: str, *args: Any) -> None:
        with contextlib.suppress(ChannelClosed):
            self._send((kind, 0, *args))

    async def call(self, kind: str, *args: Any) -> Any:
        self._next += 1
        rid = self._next
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        try:
            self._send((kind, rid, *args))
            return await fut
        finally:
            self._waiting.pop(rid, None)

    async def run(self) -> None:
        """Dispatch what comes until the other end closes; then every call waiting fails."""
        try:
            while True:
                n = int.from_bytes(await self._reader.readexactly(4), "big")
                msg = pickle.loads(await self._reader.readexactly(n))  # noqa: S301 (our own processes)
                kind, rid = msg[0], msg[1]
                if kind == "reply":
                    fut = self._waiting.get(rid)
                    if fut is not None and not fut.done():
                        if msg[2]:
                            fut.set_result(msg[3])
                        else:
                            fut.set_exception(RuntimeError(msg[3]))
                elif rid == 0:
                    if self._on_push is not None:
                        self._on_push(kind, tuple(msg[2:]))
                elif self._handle is not None:
                    task = asyncio.create_task(self._answer(kind, rid, tuple(msg[2:])))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ChannelClosed("control channel closed"))
            self._writer.close()

    async def _answer(self, kind: str, rid: int, args: tuple[Any, ...]) -> None:
        assert self._handle is not None
        try:
            reply: tuple[Any, ...] = ("reply", rid, True, await self._handle(kind, args))
        except Exception as e:  # the worker gets the reason; the supervisor goes on
            reply = ("reply", rid, False, f"{type(e).__name__}: {e}")
        with contextlib.suppress(ChannelClosed):
            self._send(reply)


class WatchedPolicies(dict[str, Any]):
    """KeyManager's policies, every change told to ``on_change(org, policy or None)``."""

    def __init__(self, initial: dict[str, Any], on_change: Callable[[str, Any], None]) -> None:
        super().__init__(initial)
        self._on_change = on_change

    def __setitem__(self, org: str, policy: Any) -> None:
        super().__setitem__(org, policy)
        self._on_change(org, policy)

    def __delitem__(self, org: str) -> None:
        super().__delitem__(org)
        self._on_change(org, None)

    def setdefault(self, org: str, policy: Any = None) -> Any:
        if org not in self:
            self[org] = policy
        return self[org]

    def pop(self, org: str, *default: Any) -> Any:
        had = org in self
        value = super().pop(org, *default)
        if had:
            self._on_change(org, None)
        return value


class Supervisor:
    """Starts ``count`` workers on the listening sockets ``listen_fds`` and answers them for ``km``
    (keys.KeyManager, or what has its policies, keys, signer_for, learn and on_key_gone)."""

    def __init__(self, km: Any, count: int, listen_fds: list[int], pac_proxies: list[str]) -> None:
        self.km, self.count, self.fds, self.pac = km, count, listen_fds, pac_proxies
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self._channels: dict[int, Channel] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        km.policies = WatchedPolicies(km.policies, lambda org, p: self._broadcast("policy", org, p))
        km.on_key_gone.append(lambda org: self._broadcast("gone", org))

    def _broadcast(self, kind: str, *args: Any) -> None:
        for ch in list(self._channels.values()):
            ch.push(kind, *args)

    async def start(self) -> None:
        for fd in self.fds:  # bound, not yet listening (asyncio listens when it starts serving)
            s = socket.socket(fileno=os.dup(fd))
            s.listen(LISTEN_BACKLOG)
            s.close()
        for i in range(self.count):
            await self._spawn(i)

    async def _spawn(self, i: int) -> None:
        mine, theirs = socket.socketpair()
        # The worker's records go where this process's go (not through its fd 2, the converting pipe).
        lines = logs.lines_fd()
        lines_fds = () if lines is None or lines == 2 else (lines,)
        proc = subprocess.Popen([sys.executable, "-m", "data_plane.worker", str(theirs.fileno()),
                                 str(lines if lines_fds else -1), *map(str, self.fds)],
                                pass_fds=(theirs.fileno(), *lines_fds, *self.fds),
                                env={**os.environ, "KEYWARD_ZEN_WORKER": str(i)})
        theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=mine)
        ch = Channel(reader, writer, self._handle)
        self.procs[i], self._channels[i] = proc, ch
        ch.push("hello", dict(self.km.policies), self.pac)
        self._keep(self._watch(i, proc, ch))

    def _keep(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, i: int, proc: subprocess.Popen[bytes], ch: Channel) -> None:
        await ch.run()  # until the worker's end closes: it exited
        code = await asyncio.to_thread(proc.wait)
        self._channels.pop(i, None)
        self._dead(proc.pid)
        if not self._stopping:
            log.warning("worker %d exited (%s); starting it again", i, code, extra={"reason": str(code)})
            await asyncio.sleep(1.0)
            if not self._stopping:
                await self._spawn(i)

    @staticmethod
    def _dead(pid: int) -> None:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]

    async def _handle(self, kind: str, args: tuple[Any, ...]) -> Any:
        if kind == "key":
            k = await self.km.signer_for(args[0])
            return None if k is None else (k.key_id, k.version, k.certificate_pem, k.chain_pem)
        if kind == "learn":
            return await self.km.learn(args[0])
        if kind == "touch":
            k = self.km.keys.get(args[0])
            if k is not None:
                k.last_used = time.monotonic()
            return None
        if kind == "sign":
            org, key_id, req = args
            k = self.km.keys.get(org)
            if k is None or k.key_id != key_id:
                raise LookupError(f"the key {key_id} of {org} is not held (dropped or rotated)")
            return await asyncio.to_thread(k.signer.sign, req)
        raise ValueError(f"unknown request {kind!r}")

    def health(self) -> dict[str, object]:
        alive = sum(1 for p in self.procs.values() if p.poll() is None)
        return {"configured": self.count, "running": alive}

    async def stop(self) -> None:
        self._stopping = True
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                await asyncio.wait_for(asyncio.to_thread(p.wait), 10)
            except TimeoutError:
                p.kill()
        for t in list(self._tasks):
            t.cancel()
