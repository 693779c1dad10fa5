"""``python -m data_plane`` (or ``keyward-zen``): run a ZEN. Configuration: the environment
(``--help`` lists every setting, from config.py).

A ZEN that cannot start says why in ONE line naming the setting, file or port
(``KEYWARD_ZEN_TLS_CERT_FILE=/x: no such file``, ``KEYWARD_ZEN_LISTEN=127.0.0.1:8080: address
already in use``) and exits 2, without a traceback. So does a ZEN whose master secret is not
the CA's (their check values differ): it could open no key. When the CA cannot be reached at
start the ZEN starts anyway (held keys and fail modes matter more) and compares at first contact.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import logging
import os
import shutil
import signal
import ssl
import sys
import tempfile
from collections.abc import Awaitable, Callable

from common import loops
from common.env import read_file, split_hostport, why
from common.hardening import no_core_dumps
from common.logs import setup
from data_plane import config
from keylib.master import MasterSecret

log = logging.getLogger("keyward.zen")


class StartupError(Exception):
    """The ZEN cannot start: the message names the setting, file or port."""


def _pem(setting: str, path: str, what: str) -> bytes:
    """A PEM file checked for what it must hold (its content is never quoted)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    data = read_file(setting, path)
    try:
        if what == "key":
            serialization.load_pem_private_key(data, None)
        else:
            x509.load_pem_x509_certificates(data)
    except (ValueError, TypeError):
        raise StartupError(f"{setting}={path}: not a PEM " + ("private key (unencrypted)" if what == "key"
                                                               else "certificate")) from None
    return data


def _master(cfg: config.ZenConfig) -> MasterSecret:
    from keylib.errors import MasterSecretError, SecureMemoryError

    read_file("KEYWARD_MASTER_SECRET_FILE", cfg.master_secret_file)  # readable at all (named in one line)
    try:
        return MasterSecret.load(path=cfg.master_secret_file, require_lock=cfg.require_mlock)
    except MasterSecretError as e:
        raise StartupError(f"KEYWARD_MASTER_SECRET_FILE={cfg.master_secret_file}: {e}") from None
    except SecureMemoryError as e:
        raise StartupError(f"KEYWARD_REQUIRE_MLOCK=true: the master secret cannot be locked in memory ({e}); "
                           "or set KEYWARD_REQUIRE_MLOCK=false") from None


async def _listen(setting: str, addr: str,
                  handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]) -> asyncio.Server:
    host, port = split_hostport(addr)
    try:
        return await asyncio.start_server(handler, host, port, limit=64 * 1024, start_serving=False)
    except OSError as e:
        raise StartupError(f"{setting}={addr}: {why(e)}") from None


async def run(cfg: config.ZenConfig) -> None:
    from data_plane.proxy import origin_context

    trust = _pem("KEYWARD_ZEN_CA_TRUST_FILE", cfg.ca_trust_file, "certificate")
    cert = _pem("KEYWARD_ZEN_TLS_CERT_FILE", cfg.tls_cert_file, "certificate")
    key = _pem("KEYWARD_ZEN_TLS_KEY_FILE", cfg.tls_key_file, "key")
    try:
        roots = (origin_context(cfg.extra_roots_file), origin_context(cfg.extra_roots_file, ("http/1.1",)))
    except ssl.SSLError:  # an OSError too: first
        raise StartupError(f"KEYWARD_ZEN_EXTRA_ROOTS_FILE={cfg.extra_roots_file}: no PEM certificate in it") from None
    except OSError as e:
        raise StartupError(f"KEYWARD_ZEN_EXTRA_ROOTS_FILE={cfg.extra_roots_file}: {why(e)}") from None
    master = _master(cfg)
    try:
        await _serve(cfg, master, trust, cert, key, roots)
    finally:
        master.wipe()  # also when a port or the CA's check value stops the start


async def _serve(cfg: config.ZenConfig, master: MasterSecret, trust: bytes, cert: bytes, key: bytes,
                 roots: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    from data_plane import metrics
    from data_plane.ca_client import CAClient
    from data_plane.keys import KeyManager
    from data_plane.mint import Minter
    from data_plane.origins import OriginPool, Sessions
    from data_plane.proxy import Proxy

    client = CAClient(cfg.ca_addr, trust_pem=trust, cert_pem=cert, key_pem=key)
    km = KeyManager(client, master, require_lock=cfg.require_mlock, max_keys=cfg.max_keys)
    minter = Minter(leaf_hours=cfg.leaf_hours, cache_size=cfg.leaf_cache_size)
    km.on_key_gone.append(minter.forget)  # leaves minted under a key that is gone are forgotten with it
    pool = OriginPool(max_idle=cfg.origin_pool, idle_seconds=cfg.origin_idle)
    proxy = Proxy(km, minter, roots[0], origin_h1_ctx=roots[1], resolve=dict(cfg.resolve),
                  pac_proxies=list(cfg.pac_proxies), pool=pool, sessions=Sessions(seconds=cfg.origin_session_seconds))
    km.on_key_gone.append(proxy.dialer.forget)  # an org whose key is gone keeps no origin connection nor session
    server = await _listen("KEYWARD_ZEN_LISTEN", cfg.listen, proxy.handle)
    host = split_hostport(cfg.listen)[0]
    bound = server.sockets[0].getsockname()[1]
    proxy.pac_proxies = list(cfg.pac_proxies) or [f"{host}:{bound}"]
    sup = None
    health = km.health
    if cfg.workers > 1:  # the workers serve the socket; this process keeps the keys (data_plane/workers.py)
        from data_plane.workers import Supervisor

        sup = Supervisor(km, cfg.workers, [s.fileno() for s in server.sockets], proxy.pac_proxies)

        def health() -> tuple[bool, dict[str, object]]:
            assert sup is not None
            ok, report = km.health()
            w = sup.health()
            report["workers"] = w
            return ok and w["running"] == w["configured"], report
    if await km.check_master() is False:
        server.close()
        await client.close()
        raise StartupError(km.master_problem)
    if cfg.metrics_listen:
        try:
            mport = metrics.serve(cfg.metrics_listen, health)
        except OSError as e:
            raise StartupError(f"KEYWARD_ZEN_METRICS_LISTEN={cfg.metrics_listen}: {why(e)}") from None
        log.info("metrics listening", extra={"port": mport})
    if km.master_ok is None:
        log.warning("the CA could not be reached at start: held keys and fail modes apply; the master secret "
                    "is compared with the CA's at first contact", extra={"master_check": km.master_check})
    km.start()
    if sup is not None:
        await sup.start()
    else:
        await server.start_serving()
    # The check value is not secret: compare it with the CA's start line.
    log.info("ZEN listening", extra={"port": bound, "master_check": km.master_check})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    if sup is not None:
        await sup.stop()
    await km.stop()
    pool.close()
    await client.close()

def _parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="keyward-zen", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="keyward ZEN: the TLS-inspecting forward proxy (python -m data_plane). Configured by the "
                    "environment; a setting that is wrong stops it with one line naming it (exit 2).",
        epilog="settings (environment):\n" + config.settings_table())


def main(argv: list[str] | None = None) -> int:
    _parser().parse_args(sys.argv[1:] if argv is None else argv)
    setup("INFO", "keyward-zen", queued=True)  # a stalled log reader must not stall the proxy
    try:
        cfg = config.from_env()
        logging.getLogger().setLevel(cfg.log_level)
        no_core_dumps()
        if cfg.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # Before prometheus_client is imported, here and in the workers (which inherit it).
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="keyward-zen-metrics-")
            atexit.register(shutil.rmtree, os.environ["PROMETHEUS_MULTIPROC_DIR"], True)
        loops.run(run(cfg), cfg.event_loop)
    except (config.ZenConfigError, StartupError) as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
