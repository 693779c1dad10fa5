"""common.status: one meaning of a failed call to the CA for every client (issue 12 point 5).

The ZEN and the operator used to disagree: for the ZEN everything but PERMISSION_DENIED and
FAILED_PRECONDITION meant "unavailable" (UNAUTHENTICATED or INVALID_ARGUMENT kept a key the CA no
longer gives it, and marked the CA unreachable though it had answered); for the operator only
UNAVAILABLE and DEADLINE_EXCEEDED did (a write over its rate limit, RESOURCE_EXHAUSTED, or a
concurrent change, ABORTED, raised a Warning Event asking a person to act). One table now, and
what each client does with each class is tested below, code by code."""

from __future__ import annotations

import asyncio
import threading
import types
from typing import Any

import grpc
import pytest

from common.status import Outcome, classify

R, N, B = Outcome.RETRY, Outcome.REFUSED, Outcome.BROKEN
TABLE = {
    "CANCELLED": R, "UNKNOWN": B, "INVALID_ARGUMENT": N, "DEADLINE_EXCEEDED": R, "NOT_FOUND": N,
    "ALREADY_EXISTS": N, "PERMISSION_DENIED": N, "RESOURCE_EXHAUSTED": R, "FAILED_PRECONDITION": N,
    "ABORTED": R, "OUT_OF_RANGE": N, "UNIMPLEMENTED": N, "INTERNAL": B, "UNAVAILABLE": R, "DATA_LOSS": B,
    "UNAUTHENTICATED": N,
}
CODES = [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK]


def test_every_grpc_code_has_its_class() -> None:
    assert sorted(TABLE) == sorted(c.name for c in CODES)
    assert {c: classify(c) for c in TABLE} == TABLE
    assert classify("SOMETHING_NEW") is Outcome.BROKEN  # a code this table does not know: a person looks
    with pytest.raises(ValueError):
        classify("OK")


def _rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=f"the CA says {code.name}")


# ZEN: RETRY and BROKEN keep what it holds (CAUnavailable); REFUSED is acted on (the key is dropped).
ZEN = {R: "CAUnavailable", B: "CAUnavailable", N: "CARefused"}


@pytest.mark.parametrize("code", CODES, ids=lambda c: c.name)
def test_the_zen_client(code: grpc.StatusCode) -> None:
    from data_plane import ca_client

    err = ca_client._error(_rpc_error(code))
    want = {"PERMISSION_DENIED": "KeyRefused", "FAILED_PRECONDITION": "NoActiveKey"}.get(code.name) \
        or ZEN[classify(code.name)]
    assert type(err).__name__ == want
    assert isinstance(err, ca_client.CARefused) is (classify(code.name) is Outcome.REFUSED)


# Operator: RETRY waits for the next pass (CAUnavailable); REFUSED and BROKEN are for a person (CARefused:
# the pool's Registered condition and a Warning Event).
@pytest.mark.parametrize("code", CODES, ids=lambda c: c.name)
def test_the_operator_client(code: grpc.StatusCode, monkeypatch: pytest.MonkeyPatch) -> None:
    from k8s.operator import ca_client

    class Stub:
        def __init__(self, _chan: object) -> None:
            pass

        def __getattr__(self, _name: str) -> Any:
            async def call(*_a: object, **_k: object) -> object:
                raise _rpc_error(code)
            return call

    client = ca_client.CAClient.__new__(ca_client.CAClient)
    client.cfg = types.SimpleNamespace(ca_target="ca:50051", ca_call_timeout=1.0)  # type: ignore[assignment]

    async def channel() -> object:
        return object()
    monkeypatch.setattr(client, "_channel", channel)
    monkeypatch.setattr(ca_client.pbg, "AdminStub", Stub)
    want = ca_client.CAUnavailable if classify(code.name) is Outcome.RETRY else ca_client.CARefused
    with pytest.raises(want):
        asyncio.run(client._call("ListZenPools", object()))
    if code is grpc.StatusCode.NOT_FOUND:  # deregistering what is gone is done
        assert asyncio.run(client._call("DeregisterZenPool", object())) is None


# The CLI: 1 for REFUSED and BROKEN (the CA said no, or failed), 4 for RETRY (run it again); 3 when no
# answer came at all (the transport's own UNAVAILABLE or the client's deadline).
class _Err(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize("code", CODES, ids=lambda c: c.name)
def test_the_cli_exit_codes(code: grpc.StatusCode) -> None:
    from control_plane.adminctl.connect import REFUSED, RETRY, UNREACHABLE, Conn

    ready = threading.Event()
    ready.set()
    conn = types.SimpleNamespace(target=types.SimpleNamespace(addr="ca:50051", name="platform-admin", cacert="ca.crt",
                                                              cert="c.crt"),
                                 timeout=5.0, request_id="r-1", _ready=ready)
    details = "UPDATE did not finish within its deadline (server cap 30s)" if code is grpc.StatusCode.DEADLINE_EXCEEDED \
        else "internal error (ref 0123abcd); the request was not applied" if code is grpc.StatusCode.INTERNAL \
        else "the CA says so"
    err = Conn.failure(conn, _Err(code, details), write=True)  # type: ignore[arg-type]
    assert err.code == (RETRY if classify(code.name) is Outcome.RETRY else REFUSED), (err.code, str(err))
    assert str(err).startswith(f"{code.name}: ")
    if classify(code.name) is Outcome.BROKEN:
        assert "the CA failed" in str(err)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        assert "--request-id r-1" in str(err)  # a write that may have happened: repeat it as it was
    # No answer at all: the transport's UNAVAILABLE, or the client's own deadline.
    assert Conn.failure(conn, _Err(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")  # type: ignore[arg-type]
                        ).code == UNREACHABLE
    assert Conn.failure(conn, _Err(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")  # type: ignore[arg-type]
                        ).code == UNREACHABLE
