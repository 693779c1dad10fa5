"""The operator's calls to the Central Authority (gRPC over mTLS).

It authenticates as spiffe://<td>/platform-admin with an identity it issues
itself from the platform root and keeps only in memory (renewed daily). The
only protobuf user in the operator.
"""

from __future__ import annotations

import uuid

import grpc
from cryptography import x509

from common.status import Outcome, classify
from k8s.operator.config import OperatorConfig
from k8s.operator.pki import Root, issue
from k8s.operator.plan import PoolState
from keylib.tlsid import renewal_due
from protos.keyward.v1 import keyward_pb2 as pb
from protos.keyward.v1 import keyward_pb2_grpc as pbg


class CAUnavailable(RuntimeError):
    """Nothing was decided (common.status RETRY: the CA is away, timed out, busy, or a concurrent
    change won); the next pass tries again."""


class CARefused(RuntimeError):
    """The CA answered no (common.status REFUSED: bad org, etc.) or failed (BROKEN): a person must
    look (the pool's Registered condition and a Warning Event say it)."""


__all__ = ["CAClient", "CARefused", "CAUnavailable", "PoolState"]


def _state(p: pb.ZenPool) -> PoolState:
    return PoolState(p.name, "private" if p.visibility == pb.POOL_VISIBILITY_PRIVATE else "public",
                     tuple(p.org_ids), p.serves_fail_closed_org)


class CAClient:
    def __init__(self, cfg: OperatorConfig, root: Root) -> None:
        self.cfg = cfg
        self.root = root
        self._chan: grpc.aio.Channel | None = None
        self._cert: x509.Certificate | None = None

    async def _channel(self) -> grpc.aio.Channel:
        if self._chan is None or self._cert is None or renewal_due(self._cert):
            if self._chan is not None:  # renewing the identity: let calls in flight finish, then close
                await self._chan.close(grace=5)
            ident = issue(self.cfg, self.root, "platform-admin", days=1)
            self._cert = x509.load_pem_x509_certificate(ident.cert_pem)
            creds = grpc.ssl_channel_credentials(root_certificates=ident.ca_pem, private_key=ident.key_pem,
                                                 certificate_chain=ident.cert_pem)
            self._chan = grpc.aio.secure_channel(self.cfg.ca_target, creds)
        return self._chan

    async def close(self) -> None:
        if self._chan is not None:
            await self._chan.close(None)
            self._chan = None

    async def _call(self, fn: str, req: object) -> object:
        stub = pbg.AdminStub(await self._channel())  # type: ignore[no-untyped-call]
        try:
            return await getattr(stub, fn)(req, timeout=self.cfg.ca_call_timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() is grpc.StatusCode.NOT_FOUND and fn == "DeregisterZenPool":
                return None  # gone already: what deregistering wants
            if classify(e.code().name) is Outcome.RETRY:
                raise CAUnavailable(f"CA at {self.cfg.ca_target}: {e.code().name}: {e.details()}") from e
            raise CARefused(f"CA {fn}: {e.code().name}: {e.details()}") from e

    async def register(self, name: str, visibility: str, org_ids: list[str]) -> PoolState:
        vis = pb.POOL_VISIBILITY_PRIVATE if visibility == "private" else pb.POOL_VISIBILITY_PUBLIC
        out = await self._call("RegisterZenPool", pb.RegisterZenPoolRequest(
            pool=pb.ZenPool(name=name, visibility=vis, org_ids=sorted(org_ids)), request_id=str(uuid.uuid4())))
        assert isinstance(out, pb.ZenPool)
        return _state(out)

    async def deregister(self, name: str) -> None:
        await self._call("DeregisterZenPool", pb.DeregisterZenPoolRequest(name=name, request_id=str(uuid.uuid4())))

    async def pools(self) -> dict[str, PoolState]:
        out = await self._call("ListZenPools", pb.ListZenPoolsRequest())
        assert isinstance(out, pb.ListZenPoolsResponse)
        return {p.name: _state(p) for p in out.pools}
