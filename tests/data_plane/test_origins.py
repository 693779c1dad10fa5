"""data_plane.origins: origin connections kept for reuse, and TLS sessions kept for resumption,
only ever used under the key they were made for (org, CONNECT host, port, verified name, ALPN
offered); a resumed session's certificate is checked again for the name.

A real Proxy (a signer process holding an org intermediate's key, the minter) between an asyncio
client and two local TLS origins that count their TCP connections: a second client connection of
the same org to the same site reuses the first one's origin connection; another org, another host,
another port or another name never does."""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from data_plane.keys import OrgKey
from data_plane.mint import Minter
from data_plane.origins import Dialer, Key, OriginPool, Sessions, check_resumed, usable
from data_plane.origins import Origin as OriginRef
from data_plane.policy import OrgPolicy
from data_plane.proxy import Proxy, origin_context
from data_plane.signer import Signer
from devstack.pki import build_cert
from keylib import proxyauth
from keylib.securemem import from_bytes

SECRET = "origins-test-secret"  # noqa: S105


@dataclass
class Pki:
    web_root: Path
    site_crt: Path
    site_key: Path
    org_root: Path
    signer: Signer
    inter_pem: str
    secret: list[bytes]
    """The intermediate key's private scalar, as bytes in both orders (to look for in a process's memory)."""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pki]:
    d = tmp_path_factory.mktemp("origins")
    web, web_key = build_cert(subject_cn="origins web root", issuer=None, issuer_key=None, is_ca=True)
    site, site_key = build_cert(subject_cn="a.test", issuer=web, issuer_key=web_key, server=True,
                                dns=["a.test", "b.test"])
    root, root_key = build_cert(subject_cn="origins org root", issuer=None, issuer_key=None, is_ca=True)
    inter, inter_key = build_cert(subject_cn="origins org intermediate", issuer=root, issuer_key=root_key, is_ca=True)
    pem = serialization.Encoding.PEM
    (d / "web.crt").write_bytes(web.public_bytes(pem))
    (d / "site.crt").write_bytes(site.public_bytes(pem))
    (d / "site.key").write_bytes(site_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    (d / "root.crt").write_bytes(root.public_bytes(pem))
    inter_pem = inter.public_bytes(pem).decode()
    der = inter_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    signer = Signer.start(from_bytes(der, require_lock=False), inter_pem)
    scalar = inter_key.private_numbers().private_value.to_bytes(32, "big")  # type: ignore[union-attr]
    yield Pki(d / "web.crt", d / "site.crt", d / "site.key", d / "root.crt", signer, inter_pem,
              [scalar, scalar[::-1]])
    signer.stop()


@dataclass
class Origin:
    """An HTTP/1.1 keep-alive origin over TLS that numbers its TCP connections."""

    port: int = 0
    accepted: int = 0
    open: list[asyncio.StreamWriter] = field(default_factory=list)
    drop_next: bool = False
    """Close the connection on the next request instead of answering (a keep-alive timeout race)."""
    server: asyncio.Server | None = None

    async def start(self, pki: Pki) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki.site_crt, pki.site_key)
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ctx)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        n = self.accepted
        self.open.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if self.drop_next:
                    self.drop_next = False
                    return
                host = [h.split(b":", 1)[1].strip() for h in head.split(b"\r\n") if h.lower().startswith(b"host:")]
                body = b"conn %d host %s" % (n, host[0] if host else b"?")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open.remove(writer)
            writer.close()

    async def close_idle(self) -> None:
        for w in list(self.open):
            w.close()
        await asyncio.sleep(0.05)

    async def stop(self) -> None:
        await self.close_idle()
        assert self.server is not None
        self.server.close()


class Keys:
    """What Proxy asks of keys.KeyManager, for local orgs sharing one signer."""

    def __init__(self, pki: Pki, orgs: list[str]) -> None:
        verifier = proxyauth.make(SECRET, iterations=proxyauth.MIN_ITERATIONS)
        self.policies = {o: OrgPolicy(o, proxy_verifiers=(verifier,)) for o in orgs}
        self.keys = {o: OrgKey(o, "k1", 1, pki.inter_pem, pki.org_root.read_text(), pki.signer) for o in orgs}
        self.on_key_gone: list[Callable[[str], None]] = []

    async def signer_for(self, org_id: str) -> OrgKey | None:
        return self.keys.get(org_id)

    async def learn(self, org_id: str) -> OrgPolicy | None:
        return self.policies.get(org_id)


async def connect(proxy_port: int, org: str, host: str, port: int
                  ) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    """CONNECT through the proxy: the answer's head, and the connection."""
    r, w = await asyncio.open_connection("127.0.0.1", proxy_port)
    auth = base64.b64encode(f"{org}:{SECRET}".encode()).decode()
    w.write(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\nProxy-Authorization: Basic {auth}\r\n\r\n"
            .encode())
    return await r.readuntil(b"\r\n\r\n"), r, w


async def fetch(proxy_port: int, org: str, host: str, port: int, sni: str, trust: ssl.SSLContext,
                method: str = "GET", body: bytes = b"") -> bytes:
    """One request on a new intercepted connection; the response body."""
    head, r, w = await connect(proxy_port, org, host, port)
    assert b" 200 " in head, head
    await w.start_tls(trust, server_hostname=sni)
    extra = f"Content-Length: {len(body)}\r\n" if body else ""
    w.write(f"{method} / HTTP/1.1\r\nHost: {sni}\r\n{extra}\r\n".encode() + body)
    head = await r.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    n = int(next(h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")))
    data = await r.readexactly(n)
    w.close()
    return data


async def _until(cond: Callable[[], bool]) -> None:
    for _ in range(200):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def run(pki: Pki, test: Callable[[Proxy, int, list[Origin], ssl.SSLContext], Awaitable[None]],
        orgs: tuple[str, ...] = ("org-a", "org-b"), pool: int = 256) -> None:
    async def main() -> None:
        origins = [Origin(), Origin()]
        for o in origins:
            await o.start(pki)
        roots = str(pki.web_root)
        proxy = Proxy(Keys(pki, list(orgs)), Minter(), origin_context(roots),  # type: ignore[arg-type]
                      origin_h1_ctx=origin_context(roots, ("http/1.1",)),
                      resolve={"a.test": "127.0.0.1", "b.test": "127.0.0.1"}, pool=OriginPool(max_idle=pool),
                      sessions=Sessions(seconds=600))
        server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
        trust = ssl.create_default_context(cafile=str(pki.org_root))
        try:
            await test(proxy, server.sockets[0].getsockname()[1], origins, trust)
        finally:
            server.close()
            proxy.dialer.pool.close()
            for o in origins:
                await o.stop()
    asyncio.run(main())


def test_an_origin_connection_is_reused_only_by_the_same_org_for_the_same_host_port_and_name(pki: Pki) -> None:
    async def test(proxy: Proxy, port: int, origins: list[Origin], trust: ssl.SSLContext) -> None:
        pool = proxy.dialer.pool
        one, two = origins
        assert await fetch(port, "org-a", "a.test", one.port, "a.test", trust) == b"conn 1 host a.test"
        await _until(lambda: len(pool) == 1)
        # The same org, host, port and name: the idle origin connection serves the next client connection.
        assert await fetch(port, "org-a", "a.test", one.port, "a.test", trust) == b"conn 1 host a.test"
        await _until(lambda: len(pool) == 1)
        assert one.accepted == 1
        # Another org: a connection of its own, though everything else is the same.
        assert await fetch(port, "org-b", "a.test", one.port, "a.test", trust) == b"conn 2 host a.test"
        # Another name (the SNI, which the origin must prove), the CONNECT host the same.
        assert await fetch(port, "org-a", "a.test", one.port, "b.test", trust) == b"conn 3 host b.test"
        # Another CONNECT host, the name the same as a pooled connection's.
        assert await fetch(port, "org-a", "b.test", one.port, "a.test", trust) == b"conn 4 host a.test"
        # Another port (another origin), the same org, host and name.
        assert await fetch(port, "org-a", "a.test", two.port, "a.test", trust) == b"conn 1 host a.test"
        assert (one.accepted, two.accepted) == (4, 1)
        await _until(lambda: len(pool) == 5)
        # Each of those again: every one finds its own.
        for org, host, origin, sni, conn in (("org-b", "a.test", one, "a.test", 2), ("org-a", "a.test", one, "b.test", 3),
                                             ("org-a", "b.test", one, "a.test", 4), ("org-a", "a.test", two, "a.test", 1),
                                             ("org-a", "a.test", one, "a.test", 1)):
            assert await fetch(port, org, host, origin.port, sni, trust) == b"conn %d host %s" % (conn, sni.encode())
            await _until(lambda: len(pool) == 5)
        assert (one.accepted, two.accepted) == (4, 1)
        # An org whose key is gone keeps none.
        pool.forget("org-a")
        assert len(pool) == 1
        assert await fetch(port, "org-a", "a.test", one.port, "a.test", trust) == b"conn 5 host a.test"
    run(pki, test)


def test_a_pooled_connection_its_origin_closed_is_not_used(pki: Pki) -> None:
    async def test(proxy: Proxy, port: int, origins: list[Origin], trust: ssl.SSLContext) -> None:
        one = origins[0]
        assert await fetch(port, "org-a", "a.test", one.port, "a.test", trust) == b"conn 1 host a.test"
        await _until(lambda: len(proxy.dialer.pool) == 1)
        await one.close_idle()  # the origin's keep-alive timeout: it closes first
        assert await fetch(port, "org-a", "a.test", one.port, "a.test", trust) == b"conn 2 host a.test"
        await _until(lambda: len(proxy.dialer.pool) == 1)
        # Closed just as it is used (the request crossed the origin's close): sent again on a new connection.
        one.drop_next = True
        assert await fetch(port, "org-a", "a.test", one.port, "a.test", trust) == b"conn 3 host a.test"
        await _until(lambda: len(proxy.dialer.pool) == 1)
        # Not a request with a body: the origin might have acted on it; the client sees the connection end.
        one.drop_next = True
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            await fetch(port, "org-a", "a.test", one.port, "a.test", trust, method="POST", body=b"x")
        assert one.accepted == 3
    run(pki, test)


def test_the_pool_is_bounded_and_expires(pki: Pki) -> None:
    async def main() -> None:
        origin = Origin()
        await origin.start(pki)
        ctx = origin_context(str(pki.web_root), ("http/1.1",))

        async def conn() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_connection("127.0.0.1", origin.port, ssl=ctx, server_hostname="a.test")

        pool = OriginPool(max_idle=3, per_key=2, idle_seconds=0.2)
        keys: list[Key] = [("o", "a.test", origin.port, "a.test", False), ("o", "b.test", origin.port, "a.test", False)]
        for k in (keys[0], keys[0], keys[0], keys[1], keys[1]):
            assert pool.put(k, *await conn(), "http/1.1", ("a.test",))
        assert len(pool) == 3  # per key 2, in all 3: the oldest went first
        assert pool.has_host("o", "a.test", origin.port) and pool.has_host("o", "b.test", origin.port)
        assert not pool.has_host("p", "a.test", origin.port) and not pool.has_host("o", "a.test", 1)
        assert pool.take(keys[1]) is not None and len(pool) == 2
        assert pool.take(("p", *keys[0][1:]), ) is None  # type: ignore[arg-type]
        await asyncio.sleep(0.4)
        assert len(pool) == 0 and pool.take(keys[0]) is None  # idle too long: closed
        assert not pool.has_host("o", "a.test", origin.port) and not pool.has_host("o", "b.test", origin.port)
        # Bytes nobody asked for (an origin's 408 before it closes): never handed out.
        r, w = await conn()
        r.feed_data(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        assert not usable(r, w) and not pool.put(keys[0], r, w, "http/1.1", ())
        pool.close()
        await origin.stop()
    asyncio.run(main())




def test_a_tls_session_is_resumed_only_under_its_key_and_its_certificate_checked_again(pki: Pki) -> None:
    async def main() -> None:
        origin = Origin()
        await origin.start(pki)
        roots = str(pki.web_root)
        sessions = Sessions(seconds=600)
        dialer = Dialer(origin_context(roots), origin_context(roots, ("http/1.1",)), {"a.test": "127.0.0.1",
                        "b.test": "127.0.0.1"}, OriginPool(max_idle=0), sessions)

        async def once(key: Key) -> bool:
            """A request on a new connection for ``key``, which is then closed; whether it resumed."""
            r, w = await dialer.open(key)
            w.write(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            await r.readuntil(b"\r\n\r\n")  # the ticket came before the answer: it is read by now
            o = OriginRef(key, r, w)
            dialer.release(o, reusable=False)
            return bool(w.get_extra_info("ssl_object").session_reused)

        a: Key = ("org-a", "a.test", origin.port, "a.test", False)
        assert not await once(a)
        assert await once(a)  # the same key: resumed
        for other in (("org-b", *a[1:]), ("org-a", "b.test", *a[2:]), (*a[:3], "b.test", False), (*a[:4], True)):
            assert not await once(other), other  # another org, host, name or ALPN offer: a full handshake
        dialer.forget("org-a")
        assert not await once(a)  # the org's key gone: its sessions with it
        await origin.stop()
    asyncio.run(main())


def test_a_resumed_certificate_must_still_prove_the_name() -> None:
    now = 1_800_000_000.0
    cert = {"subjectAltName": (("DNS", "a.test"), ("DNS", "*.b.test")),
            "notBefore": "Jan  1 00:00:00 2020 GMT", "notAfter": "Jan  1 00:00:00 2030 GMT"}
    assert check_resumed(cert, "a.test", now) and check_resumed(cert, "x.b.test", now)
    assert not check_resumed(cert, "c.test", now) and not check_resumed(cert, "b.test", now)
    assert not check_resumed(cert, "a.test", 1_900_000_000.0)  # expired since
    assert not check_resumed(None, "a.test", now) and not check_resumed({}, "a.test", now)


def test_a_pooled_connection_goes_with_a_client_whose_handshake_fails(pki: Pki) -> None:
    async def test(proxy: Proxy, port: int, origins: list[Origin], trust: ssl.SSLContext) -> None:
        one = origins[0]
        assert await fetch(port, "org-a", "a.test", one.port, "a.test", trust) == b"conn 1 host a.test"
        await _until(lambda: len(proxy.dialer.pool) == 1 and len(one.open) == 1)
        head, r, w = await connect(port, "org-a", "a.test", one.port)
        assert b" 200 " in head
        with pytest.raises(ssl.SSLError):  # the client trusts another root: it refuses the leaf
            await w.start_tls(ssl.create_default_context(), server_hostname="a.test")
        w.close()
        # The pooled connection it took is closed with it, not leaked (nor put back unused).
        await _until(lambda: len(one.open) == 0)
        assert len(proxy.dialer.pool) == 0
    run(pki, test)


@pytest.mark.parametrize("pool", [256, 0], ids=["pooled", "no-pool"])
def test_an_http2_origin_connection_is_reused_or_its_session_resumed(pki: Pki, pool: int) -> None:
    """Browsers speak h2 to h2 origins: the origin connection, with no stream open when its
    client leaves, serves the next client connection of the same key (its endpoint still read);
    without the pool, its TLS session (whose ticket comes after the handshake) is resumed."""
    from data_plane import metrics
    from tests.origins import H2Origin

    def count(how: str) -> float:
        return metrics.ORIGIN_CONNECTIONS.labels(how)._value.get()  # type: ignore[attr-defined, no-any-return]

    async def test(proxy: Proxy, port: int, origins: list[Origin], trust: ssl.SSLContext) -> None:
        with H2Origin(pki.site_crt, pki.site_key) as h2o:
            before = {how: count(how) for how in ("new", "resumed", "reused")}
            for i in range(3):
                p = await asyncio.create_subprocess_exec(
                    "curl", "-sS", "--http2", "--max-time", "20", "--proxy", f"http://127.0.0.1:{port}",
                    "--proxy-user", f"org-a:{SECRET}", "--cacert", str(pki.org_root),
                    "--resolve", f"a.test:{h2o.port}:127.0.0.1", f"https://a.test:{h2o.port}/hello",
                    f"https://a.test:{h2o.port}/hello?{i}", stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE)
                out, err = await p.communicate()
                assert p.returncode == 0 and out.endswith(f"/hello?{i} over h2\n".encode()), err
                if pool:
                    await _until(lambda: len(proxy.dialer.pool) == 1)
            got = {how: count(how) - before[how] for how in before}
            assert got == ({"new": 1, "resumed": 0, "reused": 2} if pool else {"new": 1, "resumed": 2, "reused": 0})
    run(pki, test, pool=pool)
