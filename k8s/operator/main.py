"""The operator's process: ``python -m k8s.operator``.

Leader election first (a coordination Lease, see ``leader``): every replica
serves /healthz at once, only the Lease holder runs kopf with the handlers.
A leader that loses the Lease stops kopf and exits non-zero, so it comes
back as a follower; a leader told to stop (SIGTERM) releases the Lease so
a follower takes over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys

import kopf
from aiohttp import web

from common.env import split_hostport
from common.hardening import no_core_dumps
from common.logs import setup
from k8s.operator import metrics
from k8s.operator.config import ConfigError, OperatorConfig
from k8s.operator.handlers import register
from k8s.operator.kube import Endpoint, Kube
from k8s.operator.leader import Elector

log = logging.getLogger("keyward.operator")


async def _health(listen: str) -> web.AppRunner:
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")  # the event loop answers: alive, leader or follower

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = split_hostport(listen)
    await web.TCPSite(runner, host, port).start()
    return runner


async def run(cfg: OperatorConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    health = await _health(cfg.health_listen)
    if cfg.metrics_listen:
        metrics.serve(cfg.metrics_listen)
    kube = Kube(Endpoint.resolve(cfg.kube_api))
    me = cfg.pod_name or f"{socket.gethostname()}-{os.getpid()}"
    elector = Elector(kube, cfg.namespace, f"{cfg.release}-operator", me)
    try:
        waiting = asyncio.create_task(elector.acquire())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done() or waiting.cancelled() or waiting.exception() is not None:
            waiting.cancel()
            return 0 if stop.is_set() else 1  # never leader unless acquire() said so
        stopping.cancel()
        log.info("leader: %s holds the lease %s-operator", me, cfg.release)
        metrics.LEADER.set(1)
        registry = kopf.OperatorRegistry()
        register(registry, cfg)
        kopf_stop = asyncio.Event()
        op = asyncio.create_task(kopf.operator(registry=registry, namespaces=[cfg.namespace], standalone=True,
                                               stop_flag=kopf_stop, memo=kopf.Memo()))
        holding = asyncio.create_task(elector.hold())
        stopping = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({op, holding, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if holding in done:
            # Lost the lease: another replica may act within seconds. Stop acting now, not after a
            # graceful stop (kopf handlers, a failover in a thread): exit on the spot; the kubelet
            # restarts this replica as a follower.
            log.error("leadership lost: exiting at once")
            logging.shutdown()
            os._exit(1)
        kopf_stop.set()  # asked to stop, or kopf ended: keep renewing while kopf winds down
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(op, timeout=20)
        metrics.LEADER.set(0)
        holding.cancel()
        await elector.release()
        if op in done and op.exception() is not None:
            log.error("kopf stopped: %s", op.exception())
            return 1
        return 0
    finally:
        await kube.close()
        await health.cleanup()


def main() -> None:
    # JSON lines, as every keyward process; kopf's own loggers (kopf.*, per-object ones with an
    # "object" field) propagate to the root and are written the same way.
    setup("INFO", "keyward-operator")
    no_core_dumps()  # it holds the platform root's key and the database passwords in memory
    try:
        cfg = OperatorConfig.from_env()
    except ConfigError as e:
        log.error("%s", e)
        sys.exit(2)
    sys.exit(asyncio.run(run(cfg)))


if __name__ == "__main__":
    main()
