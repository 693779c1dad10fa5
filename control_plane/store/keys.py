"""Intermediate keys: pending, active, and the tombstones of retired ones.

Contract
--------
* At most one ``pending`` and one ``active`` key per org (partial unique indexes).
* Retiring a key (rotation, revocation, discarding a pending key) is a hard
  DELETE of its row, sealed key and certificate, in the same transaction;
  only a metadata tombstone (fingerprint, serial, dates) is kept in
  ``intermediate_history``. It calls ``on_retire``: the CA then removes the
  WAL that carried the key from every server's pg_wal in the background.
* The distribution read (:meth:`Keys.distribution_view`) is replica-ok: it takes no
  standby's answer behind the key version the caller has seen (its ``floor``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from control_plane.certs import CertInfo, KeyAlgorithm
from control_plane.custody import PendingKey
from control_plane.errors import FailedPrecondition, NotFound
from control_plane.store.rows import (
    NO_REQUEST,
    ActiveKey,
    Actor,
    IntermediateRow,
    OrgRow,
    PoolRow,
    RequestKey,
    intermediate_row,
    org_row,
)
from control_plane.store.tx import Conn
from control_plane.store.work import Writes


async def tombstone(conn: Conn, r: dict[str, Any], state: str, reason: str) -> None:
    await conn.execute(
        "INSERT INTO intermediate_history (key_id, org_id, state, version, algorithm, spki_sha256, subject,"
        " serial_hex, not_before, not_after, created_at, activated_at, reason)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (r["key_id"], r["org_id"], state, r["version"], r["algorithm"], r["spki_sha256"], r["subject"],
         r["serial_hex"], r["not_before"], r["not_after"], r["created_at"], r["activated_at"], reason[:200]))


async def intermediate(conn: Conn, org_id: str, key_id: str) -> IntermediateRow:
    """The key, live or retired."""
    for q in ("SELECT *, NULL::timestamptz AS ended_at FROM intermediate_keys WHERE org_id = %s AND key_id = %s",
              "SELECT * FROM intermediate_history WHERE org_id = %s AND key_id = %s"):
        cur = await conn.execute(q, (org_id, key_id))
        r = await cur.fetchone()
        if r is not None:
            return intermediate_row(r)
    raise NotFound(f"key {key_id} not found in organization {org_id!r}")


class Keys(Writes):
    async def add_pending_key(self, actor: Actor, pending: PendingKey,
                              request_id: RequestKey = NO_REQUEST) -> dict[str, Any]:
        """Store a new sealed pending key; a previous pending key is discarded.
        Returns the request's result (the stored one, for a replayed request)."""
        async with self._work(actor, "RequestIntermediateCsr", request_id) as w:
            if w.replayed is not None:
                return w.replayed
            cur = await w.conn.execute("SELECT 1 FROM organizations WHERE org_id = %s", (pending.org_id,))
            if not await cur.fetchone():
                raise NotFound(f"organization {pending.org_id!r} not found")
            cur = await w.conn.execute(
                "DELETE FROM intermediate_keys WHERE org_id = %s AND state = 'pending' RETURNING *",
                (pending.org_id,))
            for old in await cur.fetchall():
                await tombstone(w.conn, old, "discarded", "replaced by a newer CSR")
                self.on_retire()
            await w.conn.execute(
                "INSERT INTO intermediate_keys (key_id, org_id, state, algorithm, keylib_format, spki_sha256,"
                " sealed_key) VALUES (%s, %s, 'pending', %s, %s, %s, %s)",
                (pending.key_id, pending.org_id, pending.algorithm.value, pending.keylib_format,
                 pending.spki_sha256, pending.sealed))
            w.result = {"key_id": pending.key_id, "csr_pem": pending.csr_pem,
                        "algorithm": pending.algorithm.value, "spki_sha256": pending.spki_sha256.hex()}
            w.audit(org_id=pending.org_id, key_id=pending.key_id, detail=f"algorithm={pending.algorithm.value}")
        return w.result

    async def activate(
        self,
        actor: Actor,
        org_id: str,
        validate: Callable[[bytes], tuple[CertInfo, str, str]],
        request_id: RequestKey = NO_REQUEST,
    ) -> IntermediateRow:
        """Activate the org's pending key with a certificate ``validate`` accepts.

        ``validate(pending_spki_sha256)`` runs inside the transaction and
        returns (info, certificate_pem, chain_pem) or raises. The previous
        active key and certificate are deleted in the same transaction.
        """
        async with self._work(actor, "UploadIntermediateCertificate", request_id) as w:
            if w.replayed is not None:
                return await intermediate(w.conn, org_id, w.replayed["key_id"])
            cur = await w.conn.execute("SELECT * FROM organizations WHERE org_id = %s FOR UPDATE", (org_id,))
            org = await cur.fetchone()
            if org is None:
                raise NotFound(f"organization {org_id!r} not found")
            cur = await w.conn.execute(
                "SELECT * FROM intermediate_keys WHERE org_id = %s AND state = 'pending' FOR UPDATE", (org_id,))
            pending = await cur.fetchone()
            if pending is None:
                raise FailedPrecondition(
                    f"organization {org_id!r} has no pending key: call RequestIntermediateCsr, "
                    "sign its CSR, then upload the certificate")
            ci, cert_pem, chain_pem = validate(bytes(pending["spki_sha256"]))
            cur = await w.conn.execute(
                "DELETE FROM intermediate_keys WHERE org_id = %s AND state = 'active' RETURNING *", (org_id,))
            retired = await cur.fetchall()
            for old in retired:
                await tombstone(w.conn, old, "rotated", f"replaced by {pending['key_id']}")
                self.on_retire()
            version = org["key_version"] + 1
            await w.conn.execute("UPDATE organizations SET key_version = %s, updated_at = now() WHERE org_id = %s",
                                 (version, org_id))
            cur = await w.conn.execute(
                "UPDATE intermediate_keys SET state = 'active', version = %s, certificate_pem = %s, chain_pem = %s,"
                " subject = %s, serial_hex = %s, not_before = %s, not_after = %s, activated_at = now()"
                " WHERE key_id = %s RETURNING *, NULL::timestamptz AS ended_at",
                (version, cert_pem, chain_pem, ci.subject, ci.serial_hex, ci.not_before, ci.not_after,
                 pending["key_id"]))
            row = await cur.fetchone()
            assert row is not None
            key_id = str(pending["key_id"])
            w.result = {"key_id": key_id}
            w.emit(org_id, "rotated", key_id=key_id, version=version)
            detail = f"version={version} serial={ci.serial_hex}"
            if retired:
                detail += " retired=" + ",".join(str(r["key_id"]) for r in retired)
            w.audit(org_id=org_id, key_id=key_id, detail=detail)
        return intermediate_row(row)

    async def revoke(self, actor: Actor, org_id: str, key_id: str, reason: str,
                     request_id: RequestKey = NO_REQUEST) -> IntermediateRow:
        async with self._work(actor, "RevokeIntermediate", request_id) as w:
            if w.replayed is not None:
                return await intermediate(w.conn, org_id, key_id)
            cur = await w.conn.execute(
                "DELETE FROM intermediate_keys WHERE org_id = %s AND key_id = %s RETURNING *", (org_id, key_id))
            r = await cur.fetchone()
            if r is None:
                cur = await w.conn.execute(
                    "SELECT state FROM intermediate_history WHERE org_id = %s AND key_id = %s", (org_id, key_id))
                h = await cur.fetchone()
                if h:
                    raise FailedPrecondition(f"key {key_id} is already {h['state']}; nothing to revoke")
                raise NotFound(f"key {key_id} not found in organization {org_id!r}")
            await tombstone(w.conn, r, "revoked" if r["state"] == "active" else "discarded",
                            reason or "revoked by admin")
            self.on_retire()
            w.result = {"key_id": key_id}
            if r["state"] == "active":
                w.emit(org_id, "revoked", key_id=key_id, version=r["version"] or 0)
            w.audit(org_id=org_id, key_id=key_id, detail=f"was={r['state']} reason={reason[:100]}")
            t = await intermediate(w.conn, org_id, key_id)
        return t

    async def list_intermediates(self, org_id: str) -> list[IntermediateRow]:
        async with self._tx(write=False) as conn:
            cur = await conn.execute(
                "SELECT key_id, org_id, state, version, algorithm, spki_sha256, subject, serial_hex, not_before,"
                " not_after, created_at, activated_at, NULL::timestamptz AS ended_at FROM intermediate_keys"
                " WHERE org_id = %s"
                " UNION ALL SELECT key_id, org_id, state, version, algorithm, spki_sha256, subject, serial_hex,"
                " not_before, not_after, created_at, activated_at, ended_at FROM intermediate_history"
                " WHERE org_id = %s ORDER BY created_at DESC", (org_id, org_id))
            return [intermediate_row(r) for r in await cur.fetchall()]

    async def distribution_view(self, pool_name: str, org_id: str, *, floor: int = 0
                                ) -> tuple[PoolRow | None, OrgRow | None, ActiveKey | None]:
        """The pool, the org and its active key from ONE snapshot (one statement), so a key is
        never sent on the strength of a pool binding that a concurrent change has just removed.
        The pool's ``org_ids`` holds ``org_id`` alone, when it is bound to the pool (what the rule,
        :meth:`PoolRow.serves`, needs for this org; its other bindings are not read).
        Replica-ok: from the first server whose snapshot holds a key of version ``floor`` or newer
        (a standby may lag behind a key already sent), else from the primary (no server holds a
        newer one). One round trip: a ZEN's key fetch is the CA's hottest call."""
        async def q(conn: Conn) -> dict[str, Any] | None:
            cur = await conn.execute(DISTRIBUTION_VIEW, {"pool": pool_name, "org": org_id})
            return await cur.fetchone()

        def recent(r: dict[str, Any] | None) -> bool:
            if r is None or r["org_id"] is None:  # an org is never deleted: one a key was sent of exists
                return floor == 0
            return (r["k_version"] or 0) >= floor

        r = await self._replica_read(q, accept=recent, one_statement=True)
        if r is None:
            return None, None, None
        pool = PoolRow(name=pool_name, visibility=r["pool_visibility"],
                       org_ids=(org_id,) if r["pool_bound"] else ())
        if r["org_id"] is None:
            return pool, None, None
        org = org_row(r)
        if r["k_key_id"] is None:
            return pool, org, None
        return pool, org, ActiveKey(
            org=org, key_id=str(r["k_key_id"]), version=r["k_version"], algorithm=KeyAlgorithm(r["k_algorithm"]),
            keylib_format=r["k_keylib_format"], spki_sha256=bytes(r["k_spki_sha256"]),
            sealed_key=bytes(r["k_sealed_key"]), certificate_pem=r["k_certificate_pem"],
            chain_pem=r["k_chain_pem"] or "", not_after=r["k_not_after"])


DISTRIBUTION_VIEW = """
SELECT p.visibility AS pool_visibility,
       EXISTS (SELECT 1 FROM zen_pool_orgs b WHERE b.pool = p.name AND b.org_id = %(org)s) AS pool_bound,
       o.*, k.key_id AS active_key_id,
       k.key_id AS k_key_id, k.version AS k_version, k.algorithm AS k_algorithm,
       k.keylib_format AS k_keylib_format, k.spki_sha256 AS k_spki_sha256, k.sealed_key AS k_sealed_key,
       k.certificate_pem AS k_certificate_pem, k.chain_pem AS k_chain_pem, k.not_after AS k_not_after
FROM zen_pools p
LEFT JOIN organizations o ON o.org_id = %(org)s
LEFT JOIN intermediate_keys k ON k.org_id = o.org_id AND k.state = 'active'
WHERE p.name = %(pool)s
"""
