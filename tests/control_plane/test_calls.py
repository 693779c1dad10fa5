"""control_plane.calls: the one call wrapper, for unary calls and streams alike (issue 12 point 3)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from control_plane import metrics
from control_plane.calls import Servicer, rpc
from control_plane.errors import PermissionDenied
from control_plane.identity import Identity, Role

SECRET = "-----BEGIN PRIVATE KEY----- s3cr3t"


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(code, message)
        self.code, self.message = code, message


class Context:
    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise Aborted(code, message)


class Store:
    def __init__(self) -> None:
        self.audited: list[tuple[str, str, str]] = []

    async def audit(self, actor: Any, action: str, *, org_id: str, key_id: str, outcome: str, detail: str) -> None:
        self.audited.append((action, org_id, outcome))


class Svc(Servicer):
    def identify(self, context: Any) -> Identity:
        return Identity("spiffe://keyward/zen-pool/wrapped", Role.ZEN_POOL, "wrapped")

    @rpc("TestUnary")
    async def Unary(self, request: Any, context: Any, ident: Identity) -> str:
        raise RuntimeError(SECRET)

    @rpc("TestStream")
    async def Stream(self, request: Any, context: Any, ident: Identity) -> AsyncIterator[str]:
        yield "first"
        raise RuntimeError(SECRET)

    @rpc("TestStreamRefused")
    async def StreamRefused(self, request: Any, context: Any, ident: Identity) -> AsyncIterator[str]:
        err = PermissionDenied("not yours")
        err.org_id = "globex"
        raise err
        yield "never"

    @rpc("TestStreamOk")
    async def StreamOk(self, request: Any, context: Any, ident: Identity) -> AsyncIterator[str]:
        yield "only"


def _count(method: str, code: str) -> float:
    return metrics.REGISTRY.get_sample_value("keyward_ca_rpcs_total", {"method": method, "code": code}) or 0.0


def _timed(method: str) -> float:
    return metrics.REGISTRY.get_sample_value("keyward_ca_rpc_duration_seconds_count", {"method": method}) or 0.0


async def _drain(it: AsyncIterator[str]) -> list[str]:
    return [x async for x in it]


@pytest.mark.parametrize("method,stream", [("Unary", False), ("Stream", True)])
async def test_an_unexpected_exception_is_internal_with_a_safe_message_counted_and_timed(
        method: str, stream: bool, caplog: pytest.LogCaptureFixture) -> None:
    svc = Svc(Store(), "keyward", 5.0)  # type: ignore[arg-type]
    name = f"Test{method}"
    before, timed = _count(name, "INTERNAL"), _timed(name)
    call = getattr(svc, method)(object(), Context())
    with pytest.raises(Aborted) as e:
        await (_drain(call) if stream else call)
    assert e.value.code is grpc.StatusCode.INTERNAL
    assert "s3cr3t" not in e.value.message and e.value.message.startswith("internal error (ref ")
    ref = e.value.message.split("(ref ", 1)[1].split(")", 1)[0]
    assert any(ref in r.getMessage() and r.exc_info for r in caplog.records)  # the traceback, under the ref
    assert _count(name, "INTERNAL") == before + 1 and _timed(name) == timed + 1


async def test_a_refused_stream_is_audited_under_the_org_it_concerns() -> None:
    store = Store()
    svc = Svc(store, "keyward", 5.0)  # type: ignore[arg-type]
    before = _count("TestStreamRefused", "PERMISSION_DENIED")
    with pytest.raises(Aborted) as e:
        await _drain(svc.StreamRefused(object(), Context()))
    assert e.value.code is grpc.StatusCode.PERMISSION_DENIED and e.value.message == "not yours"
    assert store.audited == [("TestStreamRefused", "globex", "PERMISSION_DENIED")]
    assert _count("TestStreamRefused", "PERMISSION_DENIED") == before + 1


async def test_a_stream_that_ends_is_ok_and_one_the_client_cancels_is_cancelled() -> None:
    svc = Svc(Store(), "keyward", 5.0)  # type: ignore[arg-type]
    before = _count("TestStreamOk", "OK")
    assert await _drain(svc.StreamOk(object(), Context())) == ["only"]
    assert _count("TestStreamOk", "OK") == before + 1

    cancelled = _count("TestStream", "CANCELLED")
    gen = svc.Stream(object(), Context())
    assert await gen.__anext__() == "first"
    await gen.aclose()  # the client went away mid-stream: nothing to answer, counted
    assert _count("TestStream", "CANCELLED") == cancelled + 1


def test_one_identity_has_at_most_two_writes_in_flight() -> None:
    from control_plane.calls import MAX_CONCURRENT_WRITES, _writes
    from control_plane.errors import ResourceExhausted
    from control_plane.limits import Slots

    assert MAX_CONCURRENT_WRITES == 2 and _writes.limit == MAX_CONCURRENT_WRITES
    w = Slots(_writes.what, _writes.limit, _writes.advice)
    held = [w.take("spiffe://keyward/org-admin/acme") for _ in range(MAX_CONCURRENT_WRITES)]
    with pytest.raises(ResourceExhausted, match="retry when one has finished"):
        w.take("spiffe://keyward/org-admin/acme")
    assert w.take("spiffe://keyward/org-admin/globex")  # another tenant is not affected
    w.give(held[0])
    assert w.take("spiffe://keyward/org-admin/acme")  # one finished: room again
