"""``python -m data_plane``: run a ZEN (configuration: environment, see config.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys

from data_plane import config, metrics
from data_plane.ca_client import CAClient
from data_plane.keys import KeyManager
from data_plane.mint import Minter
from data_plane.proxy import Proxy, origin_context


def _harden() -> None:
    import ctypes
    import ctypes.util
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0


async def run(cfg: config.ZenConfig) -> None:
    from keylib.master import MasterSecret

    master = MasterSecret.load(path=cfg.master_secret_file, require_lock=cfg.require_mlock)
    with open(cfg.ca_trust_file, "rb") as t, open(cfg.tls_cert_file, "rb") as c, open(cfg.tls_key_file, "rb") as k:
        client = CAClient(cfg.ca_addr, trust_pem=t.read(), cert_pem=c.read(), key_pem=k.read())
    km = KeyManager(client, master, require_lock=cfg.require_mlock, max_keys=cfg.max_keys)
    km.start()
    minter = Minter(leaf_hours=cfg.leaf_hours, cache_size=cfg.leaf_cache_size)
    km.on_key_gone.append(minter.forget)  # leaves minted under a key that is gone are forgotten with it
    host, _, port = cfg.listen.rpartition(":")
    proxy = Proxy(km, minter, origin_context(cfg.extra_roots_file),
                  origin_h1_ctx=origin_context(cfg.extra_roots_file, ("http/1.1",)), resolve=dict(cfg.resolve),
                  pac_proxies=list(cfg.pac_proxies))
    server = await asyncio.start_server(proxy.handle, host or "127.0.0.1", int(port), limit=64 * 1024)
    bound = server.sockets[0].getsockname()[1]
    proxy.pac_proxies = list(cfg.pac_proxies) or [f"{host or '127.0.0.1'}:{bound}"]
    if cfg.metrics_listen:
        logging.getLogger("keyward.zen").info(json.dumps({"msg": "metrics listening",
                                                          "port": metrics.serve(cfg.metrics_listen, km.health)}))
    logging.getLogger("keyward.zen").info(json.dumps({"msg": "ZEN listening", "port": bound}))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    await km.stop()
    await client.close()
    master.wipe()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        cfg = config.from_env()
    except config.ZenConfigError as e:
        print(f"keyward-zen: {e}", file=sys.stderr)
        return 2
    _harden()
    asyncio.run(run(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
