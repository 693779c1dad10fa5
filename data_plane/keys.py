"""The ZEN's org keys: fetched on first need, opened in locked memory,
handed to a signer process, followed through rotations and revocations,
dropped after the org's idle time, kept while the CA is down.

Contract:
* ``signer_for(org)`` returns a signer or None; None means "do not decrypt"
  (no key: refused, none active, or the CA is unreachable and none cached).
* A ROTATED event replaces the org's signer for new connections as soon as
  the new key is fetched (well within a second); REVOKED and
  ACCESS_REVOKED end the signer at once.
* Keys unused for the org's idle time are dropped (their process ends).
* At most ``max_keys`` keys are open at once; the least recently used goes first.
* A key is opened only for an org some caller authenticated as (the proxy decides
  who; this module never opens a key for a name it was merely told).
* No key is opened once the CA's master secret check value is known to differ from this ZEN's
  (``check_master``: at start, else at first contact with the CA); /healthz then says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from data_plane import metrics
from data_plane.ca_client import CAClient, CAError, CARefused, CAUnavailable, KeyMaterial
from data_plane.keyopen import open_org_key
from data_plane.policy import OrgPolicy
from data_plane.signer import MemoryNotLocked, Signer, SignerError
from keylib.kdf import master_check_value
from keylib.master import MasterSecret

log = logging.getLogger("keyward.zen.keys")


@dataclass
class OrgKey:
    org_id: str
    key_id: str
    version: int
    certificate_pem: str
    chain_pem: str
    """The intermediate's issuers up to the org's root, as the CA checked them: the minter sends
    those below the root after the intermediate (mint.issuers_to_send)."""
    signer: Signer
    last_used: float = field(default_factory=time.monotonic)


class KeyManager:
    def __init__(self, client: CAClient, master: MasterSecret, *, require_lock: bool = False,
                 max_keys: int = 16) -> None:
        self._client = client
        self._max_keys = max_keys
        """KEYWARD_ZEN_MAX_KEYS: open org keys (signer processes, each with locked memory) at most;
        the least recently used is dropped to open another."""
        self._master = master
        #: This ZEN's master secret check value (not secret), compared with the CA's.
        self.master_check = master_check_value(master) if master is not None else ""
        #: None: not compared yet (the CA was not reached); True: equal, or a CA too old to say; False: differ.
        self.master_ok: bool | None = None
        #: The one line that says the secrets differ, once they do.
        self.master_problem = ""
        self._check_warned = False
        self._require_lock = require_lock
        """KEYWARD_REQUIRE_MLOCK: an org key whose memory cannot be locked is not opened."""
        self.keys: dict[str, OrgKey] = {}
        self.policies: dict[str, OrgPolicy] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.ca_reachable = False
        #: Whether the last key opened had its memory locked (None: no key opened yet).
        self.memory_locked: bool | None = None
        self._last_seq = 0
        self._tasks: list[asyncio.Task[None]] = []
        #: Called with the org id whenever its key leaves (dropped, revoked, rotated out): whatever was
        #: made with it (minted leaves and their keys) must go too.
        self.on_key_gone: list[Callable[[str], None]] = []

    def health(self) -> tuple[bool, dict[str, object]]:
        """(healthy, report) for /healthz. Unhealthy when a key could not be opened because its
        memory cannot be locked and KEYWARD_REQUIRE_MLOCK says it must be: that org runs on its fail
        mode, and the cause (RLIMIT_MEMLOCK) is the operator's to fix."""
        report: dict[str, object] = {
            "ca_reachable": self.ca_reachable, "keys_open": len(self.keys), "max_keys": self._max_keys,
            "require_mlock": self._require_lock, "key_memory_locked": self.memory_locked,
            "orgs_known": len(self.policies)}
        problems = []
        report["master_check"] = {None: "not yet compared", True: "ok", False: "differs from the CA's"}[self.master_ok]
        if self.master_ok is False:
            problems.append(self.master_problem)
        if self.memory_locked is False:
            problems.append("key memory cannot be locked (RLIMIT_MEMLOCK too small)"
                            + ("; keys are not opened" if self._require_lock else "; keys could be swapped out"))
        report["status"] = "ok" if not problems else "degraded"
        report["problems"] = problems
        return not (self.master_ok is False or (problems and self._require_lock)), report

    def _gone(self, org_id: str) -> None:
        for f in self.on_key_gone:
            f(org_id)

    def _reachable(self, up: bool) -> None:
        self.ca_reachable = up
        metrics.CA_REACHABLE.set(1 if up else 0)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._follow(), name="zen-watch"),
                       asyncio.create_task(self._evict_loop(), name="zen-evict")]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for org in list(self.keys):
            self.drop(org, "shutdown")

    def drop(self, org_id: str, reason: str) -> None:
        k = self.keys.pop(org_id, None)
        if k is not None:
            k.signer.stop()
            self._gone(org_id)
            metrics.KEYS_HELD.set(len(self.keys))
            log.info("dropped key of %s (%s)", org_id, reason, extra={"org_id": org_id, "reason": reason})

    async def _install(self, km: KeyMaterial) -> OrgKey:
        buf = open_org_key(self._master, org_id=km.org_id, key_id=km.key_id, keylib_format=km.keylib_format,
                           sealed=km.sealed, certificate_pem=km.certificate_pem)
        try:
            signer = await asyncio.to_thread(Signer.start, buf, km.certificate_pem, require_lock=self._require_lock)
        except MemoryNotLocked:
            self.memory_locked = False
            raise
        finally:
            buf.wipe()
        self.memory_locked = signer.locked
        new = OrgKey(km.org_id, km.key_id, km.version, km.certificate_pem, km.chain_pem, signer)
        old = self.keys.get(km.org_id)
        while old is None and len(self.keys) >= self._max_keys:
            lru = min(self.keys.values(), key=lambda k: k.last_used)
            metrics.SIGNERS_EVICTED.inc()
            self.drop(lru.org_id, f"least recently used of {self._max_keys} open keys")
        self.keys[km.org_id] = new
        self.policies[km.org_id] = km.policy
        if old is not None and old.signer is not signer:
            old.signer.stop()
            self._gone(km.org_id)
        metrics.KEYS_HELD.set(len(self.keys))
        return new

    async def check_master(self) -> bool | None:
        """Compare this ZEN's master secret check value with the CA's: True (equal, or a CA too
        old to report it), False (they differ: no key will be opened), None (the CA is not
        reachable now; compared at the next contact)."""
        if self.master_ok is not None:
            return self.master_ok
        try:
            theirs = await self._client.master_check()
        except CAUnavailable:
            return None
        except CAError as e:
            if not self._check_warned:
                self._check_warned = True
                log.warning("could not compare master secret check values with the CA: %s", e,
                            extra={"reason": str(e)})
            return None
        if theirs is None:
            log.warning("the CA does not report its master secret check value (an older CA): not compared")
            self.master_ok = True
        elif theirs != self.master_check:
            self.master_problem = (f"KEYWARD_MASTER_SECRET_FILE does not match the CA's master secret (check value "
                                   f"{self.master_check}, the CA's {theirs}): the ZEN cannot open any key; use the "
                                   "same secret as the CA")
            self.master_ok = False
        else:
            self.master_ok = True
        return self.master_ok

    async def _master_refuses(self) -> bool:
        """True when no key may be opened: the secrets are known to differ (said once, at the first refusal)."""
        if self.master_ok is None and await self.check_master() is False:
            log.error("%s", self.master_problem, extra={"master_check": self.master_check})
        return self.master_ok is False

    async def _fetch(self, org_id: str) -> OrgKey | None:
        lock = self._locks.setdefault(org_id, asyncio.Lock())
        async with lock:
            have = self.keys.get(org_id)
            try:
                km = await self._client.get_key_pair(org_id, min_version=have.version if have else 0)
                self._reachable(True)
                metrics.KEY_FETCHES.labels("ok").inc()
            except CAUnavailable as e:
                self._reachable(False)
                metrics.KEY_FETCHES.labels("unavailable").inc()
                log.warning("CA unreachable fetching the key of %s: %s", org_id, e,
                            extra={"org_id": org_id, "reason": str(e)})
                return have
            except CAError as e:
                self._reachable(True)
                metrics.KEY_FETCHES.labels("refused").inc()
                log.info("no key for %s: %s", org_id, e, extra={"org_id": org_id, "reason": str(e)})
                self.drop(org_id, "refused")
                return None
            if have is not None and have.key_id == km.key_id:
                return have
            if await self._master_refuses():
                metrics.KEY_FETCHES.labels("not_opened").inc()
                self.policies[org_id] = km.policy
                return have
            try:
                return await self._install(km)
            except SignerError as e:
                # Not opened (e.g. its memory cannot be locked and KEYWARD_REQUIRE_MLOCK says it must be):
                # the org's policy still applies, with no key: its fail mode decides.
                self.policies[org_id] = km.policy
                metrics.KEY_FETCHES.labels("not_opened").inc()
                log.error("key of %s not opened: %s", org_id, e, extra={"org_id": org_id, "reason": str(e)})
                return have

    async def learn(self, org_id: str) -> OrgPolicy | None:
        """The policy of an org this ZEN has not heard of yet (created after the watch's snapshot,
        or before it arrived), from the CA, which answers only if this pool serves the org. The key
        comes along sealed and is NOT opened here: that waits until a caller authenticates."""
        if org_id in self.policies:
            return self.policies[org_id]
        try:
            km = await self._client.get_key_pair(org_id)
        except CAError as e:
            log.info("no policy for %s: %s", org_id, e, extra={"org_id": org_id, "reason": str(e)})
            return None
        self.policies.setdefault(org_id, km.policy)
        return self.policies[org_id]

    async def signer_for(self, org_id: str) -> OrgKey | None:
        k = self.keys.get(org_id)
        if k is None:
            k = await self._fetch(org_id)
        if k is not None:
            k.last_used = time.monotonic()
        return k

    async def _evict_loop(self) -> None:
        while True:
            now = time.monotonic()
            for org, k in list(self.keys.items()):
                idle = self.policies.get(org, OrgPolicy(org)).idle_seconds
                if now - k.last_used > idle:
                    self.drop(org, f"idle for {idle}s")
            await asyncio.sleep(1.0)

    async def _follow(self) -> None:
        backoff = 0.5
        while True:
            try:
                await self._master_refuses()  # at first contact, if the CA was not reached at start
                async for ev in self._client.watch(self._last_seq, snapshot=True):
                    self._reachable(True)
                    backoff = 0.5
                    if ev.seq:
                        self._last_seq = ev.seq
                    await self._on_event(ev.kind, ev.org_id, ev.policy)
            except asyncio.CancelledError:
                raise
            except CAUnavailable as e:
                self._reachable(False)
                log.warning("watch stream lost: %s", e, extra={"reason": str(e)})
            except CARefused as e:  # e.g. the pool is not registered (yet): the CA answered
                self._reachable(True)
                log.warning("watch stream refused: %s", e, extra={"reason": str(e)})
            except Exception:
                log.exception("watch stream failed")
            await asyncio.sleep(backoff)  # bounded back-off before reconnecting
            backoff = min(backoff * 2, 5.0)

    async def _on_event(self, kind: str, org_id: str, policy: OrgPolicy | None) -> None:
        if kind == "policy" and policy is not None:
            self.policies[org_id] = policy
        elif kind == "rotated":
            if org_id in self.keys:
                await self._fetch(org_id)  # new connections use the new key as soon as it is here
        elif kind == "revoked":
            self.drop(org_id, "revoked")
        elif kind == "access_revoked":
            self.drop(org_id, "access revoked")
            self.policies.pop(org_id, None)
