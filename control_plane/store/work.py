"""Idempotent admin writes: the request log.

Contract: an admin write that carries a request id (:class:`RequestKey`) is
applied at most once. Its result is remembered in ``request_log`` in the
transaction that applies it; a retry with the same id (after an "outcome
unknown") is answered from there instead of acting twice. The same id with
another caller, call or parameters is refused.
"""

from __future__ import annotations

import json
from typing import Any

from control_plane.errors import InvalidArgument
from control_plane.store.rows import Actor, RequestKey
from control_plane.store.tx import Conn, Database


async def replay(conn: Conn, request_id: RequestKey, actor: Actor, action: str) -> dict[str, Any] | None:
    """The stored result of ``request_id``, or None when it was never applied."""
    if not request_id.id:
        return None
    cur = await conn.execute("SELECT actor, action, result FROM request_log WHERE request_id = %s",
                             (request_id.id,))
    r = await cur.fetchone()
    if r is None:
        return None
    if r["actor"] != actor.spiffe_id or r["action"] != f"{action}#{request_id.params}":
        raise InvalidArgument(f"request_id {request_id.id} was already used for another call or other "
                              "parameters; use a fresh one")
    return dict(r["result"])


async def remember(conn: Conn, request_id: RequestKey, actor: Actor, action: str, result: dict[str, Any]) -> None:
    if request_id.id:
        await conn.execute(
            "INSERT INTO request_log (request_id, actor, action, result) VALUES (%s, %s, %s, %s)",
            (request_id.id, actor.spiffe_id, f"{action}#{request_id.params}", json.dumps(result)))


class Requests(Database):
    async def replayed(self, request_id: RequestKey, actor: Actor, action: str) -> dict[str, Any] | None:
        """The stored result of an already-applied request, if any."""
        if not request_id.id:
            return None
        async with self._tx(write=False) as conn:
            return await replay(conn, request_id, actor, action)
