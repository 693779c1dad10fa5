"""Wiring of the CA process: TLS, gRPC server options, health, reflection.

Hardening lives in the server options: message size caps (an oversized
request gets RESOURCE_EXHAUSTED from gRPC itself), HTTP/2 stream limits and
gRPC's own keepalive enforcement (a client pinging more often than allowed
is sent GOAWAY "too_many_pings").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from control_plane import metrics
from control_plane.calls import run_refusal_flusher
from control_plane.config import CAConfig
from control_plane.errors import ConfigError, KeywardError
from control_plane.events import EventHub
from control_plane.interceptors import IdentityInterceptor
from control_plane.service import AdminService, KeyDistributionService
from control_plane.spool import KeySentAuditor
from control_plane.store import Store
from control_plane.validator import Validator
from control_plane.walpurge import WalPurger
from keylib.guard import forbid_unwrap
from keylib.kdf import master_check_value
from keylib.master import MasterSecret
from protos.keyward.v1 import keyward_pb2 as pb
from protos.keyward.v1 import keyward_pb2_grpc as pb_grpc

log = logging.getLogger("keyward.ca")

HEALTH_PERIOD = 2.0


def server_options(cfg: CAConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", 4 * cfg.max_message_bytes),
        ("grpc.max_concurrent_streams", cfg.max_concurrent_streams),
        ("grpc.max_metadata_size", 16 * 1024),
        # Server-side keepalive: probe idle connections, drop dead peers.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # Keepalive enforcement: pings closer than 10 s apart are strikes;
        # two strikes end the connection with GOAWAY (too_many_pings).
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.max_connection_idle_ms", 15 * 60_000),
        ("grpc.so_reuseport", 0),
    ]


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path!r}: {e.strerror}") from None


@dataclass
class RunningCA:
    server: grpc.aio.Server
    port: int
    store: Store
    hub: EventHub
    health: HealthServicer
    master: MasterSecret
    _tasks: list[asyncio.Task[None]]
    _extra: list[grpc.aio.Server]
    validator: Validator

    async def stop(self, grace: float = 2.0) -> None:
        await self.server.stop(grace)
        for s in self._extra:
            await s.stop(grace)
        for t in self._tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.hub.stop()
        await self.store.close()
        self.validator.close()
        self.master.wipe()


LIVENESS = "liveness"
"""Health service name that is SERVING for as long as the CA's process runs: the liveness probe's.
A CA whose database is away is not ready (NOT_SERVING for "" and its services) but must not be
restarted for it: a restart cannot bring the database back."""


async def _health_loop(store: Store, hs: HealthServicer) -> None:
    """Admin (and "") need the primary; KeyDistribution needs any server. Both need the schema,
    which this loop creates once a primary answers (a CA may start before its database)."""
    SERVING: int = health_pb2.HealthCheckResponse.SERVING
    NOT: int = health_pb2.HealthCheckResponse.NOT_SERVING
    last: tuple[int, int] | None = None
    schema = False
    why = ""

    async def probe(ping: Callable[[], Awaitable[None]]) -> int:
        try:
            async with asyncio.timeout(HEALTH_PERIOD * 2):
                await ping()
            return SERVING
        except (KeywardError, TimeoutError):
            return NOT

    while True:
        if not schema:
            try:
                async with asyncio.timeout(8):
                    await store.migrate()
                schema = True
                log.info("schema ensured")
            except (KeywardError, TimeoutError) as e:
                # No primary yet: serve keys from the standbys if they hold the schema; writes fail
                # UNAVAILABLE; try again next period. Each new reason is logged once (a wrong password
                # is not "no primary"); KeywardError messages carry no secret.
                reason = str(e) if isinstance(e, KeywardError) else "no primary answered in 8 s"
                if reason != why:
                    why = reason
                    log.warning("could not ensure the schema (%s); retrying every %gs", reason, HEALTH_PERIOD)
        admin, keys = await probe(store.ping), await probe(store.ping_any)
        metrics.DB_UP.set(1 if admin == SERVING else 0)
        if (admin, keys) != last:
            await hs.set("", admin)
            await hs.set("keyward.v1.Admin", admin)
            await hs.set("keyward.v1.KeyDistribution", keys)
            name = health_pb2.HealthCheckResponse.ServingStatus.Name
            log.info("health: %s", name(admin), extra={"method": f"keys={name(keys)}"})
            last = (admin, keys)
        await asyncio.sleep(HEALTH_PERIOD)


async def start(cfg: CAConfig, master: MasterSecret) -> RunningCA:
    """Start a CA; the caller owns ``master`` until then, the CA after."""
    forbid_unwrap()
    creds = grpc.ssl_server_credentials(
        [(_read(cfg.tls_key_file, "TLS key"), _read(cfg.tls_cert_file, "TLS certificate"))],
        root_certificates=_read(cfg.client_ca_file, "client CA bundle"),
        require_client_auth=True,
    )
    password = _read(cfg.db_password_file, "database password").decode().rstrip("\r\n") \
        if cfg.db_password_file else None
    store = await Store.open(cfg.db_dsn, max_size=cfg.db_pool_size, wait=False, password=password)
    del password
    # A retired key's bytes leave every server's pg_wal, in the background (docs/database.md).
    purger = WalPurger(store.forget_retired_wal)
    store.on_retire = purger.notify
    hub = EventHub(store)
    await hub.start()
    server = grpc.aio.server(options=server_options(cfg), interceptors=[IdentityInterceptor(cfg.trust_domain)])
    auditor = KeySentAuditor(store, cfg.audit_spool_file)
    validator = Validator()
    pb_grpc.add_AdminServicer_to_server(  # type: ignore[no-untyped-call]
        AdminService(store, master, cfg.trust_domain, cfg.max_call_seconds, validator=validator), server)
    check = master_check_value(master)
    pb_grpc.add_KeyDistributionServicer_to_server(  # type: ignore[no-untyped-call]
        KeyDistributionService(store, hub, auditor, cfg.trust_domain, cfg.max_call_seconds,
                               cfg.max_stream_seconds, cfg.max_watch_streams, master_check=check), server)
    hs = HealthServicer()
    # Alive at once; ready only once the database says so (grpc's default for "" is SERVING).
    await hs.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    for svc in ("", "keyward.v1.Admin", "keyward.v1.KeyDistribution"):
        await hs.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    names = (
        pb.DESCRIPTOR.services_by_name["Admin"].full_name,
        pb.DESCRIPTOR.services_by_name["KeyDistribution"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    port = server.add_secure_port(cfg.listen, creds)
    if port == 0:
        raise ConfigError(f"cannot listen on {cfg.listen}")
    await server.start()
    extra: list[grpc.aio.Server] = []
    if cfg.health_listen:
        # Plaintext, health only: kubelet's gRPC probes cannot present a client certificate.
        hsrv = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(hs, hsrv)
        hport = hsrv.add_insecure_port(cfg.health_listen)
        await hsrv.start()
        extra.append(hsrv)
        log.info("health listening", extra={"port": hport})
    tasks = [asyncio.create_task(_health_loop(store, hs), name="keyward-health"),
             asyncio.create_task(auditor.run(), name="keyward-audit-spool"),
             asyncio.create_task(run_refusal_flusher(store), name="keyward-refusal-rows")]
    tasks.append(asyncio.create_task(purger.run(), name="keyward-wal-purge"))
    # The validator's worker starts beside serving, never in its way (warm() does not raise).
    tasks.append(asyncio.create_task(asyncio.to_thread(validator.warm), name="keyward-validator-warm"))
    # The master secret's check value is not secret: operators compare it with a ZEN's.
    log.info("CA listening", extra={"port": port, "master_check": check,
                                    "event_loop": type(asyncio.get_running_loop()).__module__.partition(".")[0]})
    return RunningCA(server, port, store, hub, hs, master, tasks, extra, validator)


async def serve(cfg: CAConfig, master: MasterSecret) -> None:
    if cfg.metrics_listen:
        mport = metrics.serve(cfg.metrics_listen)
        log.info("metrics listening", extra={"port": mport})
    ca = await start(cfg, master)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("CA stopping")
    await ca.stop()
