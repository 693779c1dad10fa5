"""HTTP/2 through the ZEN, request by request, with real clients and origins.

Origins: tests/origins.py (``H2Origin``: h2 and HTTP/1.1 by ALPN; ``GrpcOrigin``: grpcio over TLS).
Clients: curl (its own proxy support), nghttp and h2load (no proxy support: through a
``ConnectTunnel`` that sends the CONNECT, with the org's proxy credential), grpcurl (which
ignores HTTPS_PROXY, fullstorydev/grpcurl#166: through a tunnel too) and grpcio (HTTPS_PROXY).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import hyperframe.frame
import pytest

from tests.grpc_origin import count, say
from tests.helpers import CAProcess, Clients, OrgRoot, wait_for
from tests.integration.flow import PROXY_SECRET, activate
from tests.integration.test_zen import Web, Zen, org, start_zen, web  # noqa: F401 (fixtures)
from tests.origins import GrpcOrigin, H2Origin
from tests.tunnel import ConnectTunnel

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or "grpcurl"
PROTO = Path(__file__).resolve().parents[1] / "data" / "echo.proto"


@pytest.fixture(scope="module")
def zen(ca: CAProcess, pki_dir: Path, master_secret: tuple[bytes, Path], web: Web, workdir: Path,  # noqa: F811
        org: tuple[str, OrgRoot, Clients]) -> Iterator[Zen]:  # noqa: F811
    org_id, root, admin = org
    activate(admin, root, org_id)
    z = start_zen(ca, pki_dir, master_secret[1], web, workdir)
    yield z
    z.proc.terminate()
    z.proc.wait(15)


def _site(web: Web) -> tuple[Path, Path]:  # noqa: F811
    d = web.root_crt.parent
    return d / "site.crt", d / "site.key"


@pytest.fixture(scope="module")
def h2o(web: Web) -> Iterator[H2Origin]:  # noqa: F811
    with H2Origin(*_site(web)) as o:
        yield o


def curl(zen: Zen, org_id: str, root: OrgRoot, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "--max-time", "30", "--proxy", f"http://127.0.0.1:{zen.port}",
                           "--proxy-user", f"{org_id}:{PROXY_SECRET}", "--cacert", str(root.crt), *args],
                          capture_output=True, text=True, timeout=60)


def logged(zen: Zen, org_id: str, path: str, n: int = 1) -> list[dict[str, Any]]:
    """The access-log lines for ``path`` (each written when its stream ends: waited for)."""
    def find() -> list[dict[str, Any]] | None:
        lines = [json.loads(ln) for ln in zen.log.read_text().splitlines() if ln.startswith('{"org": "' + org_id)]
        found = [ln for ln in lines if ln.get("path") == path]
        return found if len(found) >= n else None
    result: list[dict[str, Any]] = wait_for(find, 15, f"{path} in the access log")
    return result


def test_a_blocked_stream_gets_its_403_while_the_other_stream_completes(
    zen: Zen, h2o: H2Origin, org: tuple[str, OrgRoot, Clients],  # noqa: F811
) -> None:
    org_id, root, _ = org
    # nghttp: one connection, three streams at once (a slow one, a blocked one, a quick one).
    with ConnectTunnel(zen.port, "good.test", h2o.port, org_id, PROXY_SECRET) as t:
        u = f"https://127.0.0.1:{t.port}"
        r = subprocess.run(["nghttp", "-nv", "-t", "20", "-H", ":authority: good.test", f"{u}/slow?ms=300",
                            f"{u}/private/secret", f"{u}/hello"], capture_output=True, text=True, timeout=30)
        assert t.established == 1
    out = r.stdout
    assert r.returncode == 0 and "The negotiated protocol: h2" in out, out + r.stderr
    status = {path: re.search(rf"recv \(stream_id={stream_of(out, path)}\) :status: (\d+)", out) for path in
              ("/slow?ms=300", "/private/secret", "/hello")}
    assert {p: m.group(1) if m else None for p, m in status.items()} == \
        {"/slow?ms=300": "200", "/private/secret": "403", "/hello": "200"}, out
    assert all(path != "/private/secret" for _, _, path in h2o.seen)  # never reached the origin
    blocked = logged(zen, org_id, "/private/secret")[-1]
    hello = logged(zen, org_id, "/hello")[-1]
    assert blocked["status"] == 403 and blocked["blocked"] is True and blocked["protocol"] == "h2"
    assert hello["status"] == 200 and hello["method"] == "GET" and hello["host"] == "good.test"
    assert hello["bytes"] == len("hello from good.test /hello over h2\n")
    assert hello["stream"] != blocked["stream"] and "origin_protocol" not in hello  # h2 on both sides
    # curl --http2 too (its own proxy support; one connection or two is curl's choice).
    base = f"https://good.test:{h2o.port}"
    r = curl(zen, org_id, root, "--http2", "--parallel", "-w", "%{http_version} %{http_code} %{url_effective}\n",
             f"{base}/private/secret", f"{base}/hello")
    assert f"2 403 {base}/private/secret" in r.stdout and f"2 200 {base}/hello" in r.stdout, r.stdout + r.stderr


def stream_of(nghttp_out: str, path: str) -> str:
    """The stream id nghttp -v used for ``path`` (its first ids vary by version)."""
    m = re.search(r"send HEADERS frame <[^>]*stream_id=(\d+)>(?:\n {10}.*)*?\n {10}:path: "
                  + re.escape(path) + "\n", nghttp_out)
    assert m, nghttp_out
    return m.group(1)


def test_trailers_early_hints_uploads_of_unknown_length_and_large_downloads(
    zen: Zen, h2o: H2Origin, org: tuple[str, OrgRoot, Clients], tmp_path: Path,  # noqa: F811
) -> None:
    org_id, root, _ = org
    base = f"https://good.test:{h2o.port}"
    r = curl(zen, org_id, root, "--http2", "-D", "-", f"{base}/trailers")
    assert r.returncode == 0 and "with trailers" in r.stdout and "x-checksum: abc123" in r.stdout, r.stdout + r.stderr
    r = curl(zen, org_id, root, "--http2", "-v", f"{base}/early-hints")
    assert r.returncode == 0 and "< HTTP/2 103" in r.stderr and "< link: </style.css>; rel=preload" in r.stderr
    assert r.stderr.index("< HTTP/2 103") < r.stderr.index("< HTTP/2 200") and r.stdout == "after hints\n"
    # An upload whose length nobody knows in advance (stdin): DATA frames until END_STREAM.
    payload = os.urandom(300_000)
    r = subprocess.run(["curl", "-sS", "--http2", "--max-time", "30", "--proxy", f"http://127.0.0.1:{zen.port}",
                        "--proxy-user", f"{org_id}:{PROXY_SECRET}", "--cacert", str(root.crt), "-T", "-", "-X", "POST",
                        "-D", str(tmp_path / "h"), f"{base}/echo"], input=payload, capture_output=True, timeout=60)
    assert r.returncode == 0 and r.stdout == payload, r.stderr
    assert "x-request-bytes: 300000" in (tmp_path / "h").read_text()
    # 10 MB through 64 KiB stream windows: flow control in both directions, nothing lost.
    out = tmp_path / "big"
    r = curl(zen, org_id, root, "--http2", "-o", str(out), "-w", "%{http_code} %{size_download}",
             f"{base}/big?bytes=10000000")
    assert r.returncode == 0 and r.stdout == "200 10000000", r.stdout + r.stderr
    assert logged(zen, org_id, "/big?bytes=10000000")[-1]["bytes"] == 10_000_000


def test_reset_and_goaway_from_the_origin_are_passed_on(
    zen: Zen, h2o: H2Origin, org: tuple[str, OrgRoot, Clients],  # noqa: F811
) -> None:
    org_id, root, _ = org
    base = f"https://good.test:{h2o.port}"
    r = curl(zen, org_id, root, "--http2", f"{base}/reset")
    assert r.returncode == 92 and "INTERNAL_ERROR" in r.stderr, r.stderr  # the origin's RST_STREAM code
    assert logged(zen, org_id, "/reset")[-1]["error"] == "the origin reset the stream (INTERNAL_ERROR)"
    # GOAWAY from the origin ends that origin connection; the client's stays, and its next
    # request reaches the origin over a new one.
    r = curl(zen, org_id, root, "-v", "--http2", "-w", "%{http_code}\n", f"{base}/goaway", f"{base}/hello")
    assert r.returncode == 0 and r.stdout.startswith("bye\n200\nhello from"), r.stdout + r.stderr
    assert r.stderr.count("CONNECT tunnel established") == 1


def test_server_push_is_refused_toward_the_origin(
    zen: Zen, h2o: H2Origin, org: tuple[str, OrgRoot, Clients],  # noqa: F811
) -> None:
    """A pushed response would reach the client without passing the URL policy: the ZEN
    tells origins ENABLE_PUSH=0, whatever its client allows (nghttp allows push)."""
    org_id, _, _ = org
    attempted, sent = h2o.pushes_attempted, h2o.pushes_sent
    with ConnectTunnel(zen.port, "good.test", h2o.port, org_id, PROXY_SECRET) as t:
        r = subprocess.run(["nghttp", "-nv", "-t", "20", "-H", ":authority: good.test", f"https://127.0.0.1:{t.port}/push"],
                           capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and ":status: 200" in r.stdout, r.stdout + r.stderr
    assert "PUSH_PROMISE" not in r.stdout
    assert h2o.pushes_attempted == attempted + 1 and h2o.pushes_sent == sent


def test_nghttp_and_h2load_through_a_tunnel(
    zen: Zen, h2o: H2Origin, org: tuple[str, OrgRoot, Clients],  # noqa: F811
) -> None:
    org_id, _, _ = org
    with ConnectTunnel(zen.port, "good.test", h2o.port, org_id, PROXY_SECRET) as t:
        u = f"https://127.0.0.1:{t.port}"
        # The tunnel's address is not the origin's name: the authority says which site (else 421).
        r = subprocess.run(["nghttp", "-t", "20", f"{u}/hello"], capture_output=True, text=True, timeout=30)
        assert ":status: 421" in subprocess.run(["nghttp", "-nv", "-t", "20", f"{u}/hello"], capture_output=True,
                                                 text=True, timeout=30).stdout
        r = subprocess.run(["nghttp", "-t", "20", "-H", ":authority: good.test", f"{u}/hello"],
                           capture_output=True, text=True, timeout=30)
        assert r.stdout == "hello from good.test /hello over h2\n", r.stdout + r.stderr
        r = subprocess.run(["h2load", "-n", "400", "-c", "2", "-m", "20", "-H", ":authority: good.test", f"{u}/hello"],
                           capture_output=True, text=True, timeout=60)
        assert "400 succeeded, 0 failed, 0 errored" in r.stdout and "Application protocol: h2" in r.stdout, r.stdout
    assert len(logged(zen, org_id, "/hello", 400)) >= 400


@pytest.mark.parametrize("alpn", [("http/1.1",), ("h2",)], ids=["h1-only-origin", "h2-only-origin"])
def test_mixed_protocols_are_translated(
    zen: Zen, web: Web, org: tuple[str, OrgRoot, Clients], alpn: tuple[str, ...],  # noqa: F811
) -> None:
    """An HTTP/2 client to an HTTP/1.1-only origin, and an HTTP/1.1 client to an HTTP/2-only
    origin (which refuses a handshake offering http/1.1 alone): translated, trailers included."""
    org_id, root, _ = org
    # Lines are written by the ZEN's log thread, a moment after the answer: this request's is the
    # one after those already there.
    before = len(logged(zen, org_id, "/trailers", 0))
    with H2Origin(*_site(web), alpn=alpn) as o:
        base = f"https://good.test:{o.port}"
        client = "--http2" if alpn == ("http/1.1",) else "--http1.1"
        r = curl(zen, org_id, root, client, "-D", "-", f"{base}/trailers", f"{base}/hello", f"{base}/private/x")
        assert r.returncode == 0, r.stderr
        assert "x-checksum: abc123" in r.stdout and "with trailers" in r.stdout, r.stdout
        assert f"/hello over {'http/1.1' if alpn == ('http/1.1',) else 'h2'}" in r.stdout
        assert "is blocked by your organization" in r.stdout
        assert all(p != "/private/x" for _, _, p in o.seen)
        line = logged(zen, org_id, "/trailers", before + 1)[before]
        assert line["protocol"] == ("h2" if alpn == ("http/1.1",) else "http/1.1")
        assert line["origin_protocol"] == alpn[0]


@pytest.fixture(scope="module")
def grpc_origin(web: Web) -> Iterator[GrpcOrigin]:  # noqa: F811
    with GrpcOrigin(*_site(web)) as g:
        yield g


def test_grpc_unary_and_server_stream_through_the_zen(
    zen: Zen, grpc_origin: GrpcOrigin, org: tuple[str, OrgRoot, Clients],  # noqa: F811
) -> None:
    org_id, root, _ = org
    with ConnectTunnel(zen.port, "good.test", grpc_origin.port, org_id, PROXY_SECRET) as t:
        def grpcurl(method: str, data: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([GRPCURL, "-max-time", "20", "-cacert", str(root.crt), "-authority", "good.test",
                                   "-import-path", str(PROTO.parent), "-proto", PROTO.name, "-d", data,
                                   f"127.0.0.1:{t.port}", f"keyward.test.Echo/{method}"],
                                  capture_output=True, text=True, timeout=30)
        r = grpcurl("Say", '{"text": "through the zen"}')
        assert r.returncode == 0 and json.loads(r.stdout) == {"text": "through the zen"}, r.stderr
        r = grpcurl("Count", '{"n": 3}')
        assert r.returncode == 0, r.stderr
        assert re.findall(r'"text": "(\d)"', r.stdout) == ["1", "2", "3"]
    for method in ("Say", "Count"):
        line = logged(zen, org_id, f"/keyward.test.Echo/{method}")[-1]
        assert line["method"] == "POST" and line["status"] == 200 and line["protocol"] == "h2" and "stream" in line
    # grpcio speaks to proxies itself (the grpc.http_proxy channel argument, which https_proxy sets;
    # the credential in the URL): the same calls, no tunnel.
    env_proxy = f"http://{org_id}:{PROXY_SECRET}@127.0.0.1:{zen.port}"
    creds = grpc.ssl_channel_credentials(root.crt.read_bytes())
    with grpc.secure_channel(f"good.test:{grpc_origin.port}", creds,
                             options=[("grpc.http_proxy", env_proxy)]) as ch:
        assert say(ch, "proxied") == "proxied"
        assert count(ch, 4) == ["1", "2", "3", "4"]
    assert len(logged(zen, org_id, "/keyward.test.Echo/Count", 2)) >= 2


# -- bad input: each abuse ends its own connection with the right HTTP/2 error, counted; others go on

def _raw_h2(zen: Zen, org_id: str, root: OrgRoot, port: int) -> tuple[ssl.SSLSocket, h2.connection.H2Connection]:
    """An HTTP/2 connection through the ZEN with the settings exchange done, for hand-made frames."""
    sock = socket.create_connection(("127.0.0.1", zen.port), timeout=10)
    cred = base64.b64encode(f"{org_id}:{PROXY_SECRET}".encode()).decode()
    sock.sendall(f"CONNECT good.test:{port} HTTP/1.1\r\nHost: good.test:{port}\r\n"
                 f"Proxy-Authorization: Basic {cred}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 200"), head
    ctx = ssl.create_default_context(cafile=str(root.crt))
    ctx.set_alpn_protocols(["h2"])
    tls = ctx.wrap_socket(sock, server_hostname="good.test")
    assert tls.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    tls.sendall(conn.data_to_send())
    while not any(isinstance(e, h2.events.RemoteSettingsChanged) for e in conn.receive_data(tls.recv(65536))):
        pass
    tls.sendall(conn.data_to_send())  # the SETTINGS ack: the ZEN's limits now apply
    return tls, conn


def _goaway(tls: ssl.SSLSocket) -> int | None:
    """Read frames until the ZEN's GOAWAY; its error code (None: closed without one)."""
    buf = b""
    try:
        while True:
            while len(buf) >= 9:
                length = int.from_bytes(buf[:3], "big")
                if len(buf) < 9 + length:
                    break
                if buf[3] == 0x7:  # GOAWAY
                    return int.from_bytes(buf[9 + 4:9 + 8], "big")
                buf = buf[9 + length:]
            data = tls.recv(65536)
            if not data:
                return None
            buf += data
    except (ConnectionError, ssl.SSLError, OSError):
        return None


def _headers(conn: h2.connection.H2Connection, path: str, extra: list[tuple[bytes, bytes]] | None = None
             ) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"good.test"), (b":path", path.encode()),
            *(extra or [])]


def test_floods_and_invalid_frames_end_only_their_own_connection(
    zen: Zen, h2o: H2Origin, org: tuple[str, OrgRoot, Clients],  # noqa: F811
) -> None:
    org_id, root, _ = org
    codes: dict[str, int | None] = {}

    tls, conn = _raw_h2(zen, org_id, root, h2o.port)  # PING flood (CVE-2019-9512)
    pings = []
    for i in range(1000):
        ping = hyperframe.frame.PingFrame(0)
        ping.opaque_data = i.to_bytes(8, "big")
        pings.append(ping.serialize())
    tls.sendall(b"".join(pings))
    codes["ping"] = _goaway(tls)

    tls, conn = _raw_h2(zen, org_id, root, h2o.port)  # SETTINGS flood (CVE-2019-9515)
    tls.sendall(hyperframe.frame.SettingsFrame(0, settings={4: 65535}).serialize() * 1000)
    codes["settings"] = _goaway(tls)

    tls, conn = _raw_h2(zen, org_id, root, h2o.port)  # rapid reset (CVE-2023-44487)
    for _ in range(600):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, _headers(conn, "/slow?ms=5000"), end_stream=True)
        conn.reset_stream(sid, 8)
    tls.sendall(conn.data_to_send())
    codes["reset"] = _goaway(tls)

    tls, conn = _raw_h2(zen, org_id, root, h2o.port)  # more concurrent streams than the ZEN allows
    frames = b""
    for i in range(150):
        block = conn.encoder.encode(_headers(conn, "/slow?ms=5000"))
        frame = hyperframe.frame.HeadersFrame(1 + 2 * i, flags=["END_HEADERS", "END_STREAM"])
        frame.data = block
        frames += frame.serialize()
    tls.sendall(frames)
    codes["streams"] = _goaway(tls)

    tls, conn = _raw_h2(zen, org_id, root, h2o.port)  # a header block over the limit (64 KiB)
    conn.send_headers(1, _headers(conn, "/hello", [(b"x-big", b"a" * 100_000)]), end_stream=True)
    tls.sendall(conn.data_to_send())
    codes["headers"] = _goaway(tls)

    tls, conn = _raw_h2(zen, org_id, root, h2o.port)  # DATA on stream 0: not a valid frame
    tls.sendall(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
    codes["invalid"] = _goaway(tls)

    assert codes == {"ping": 0xb, "settings": 0xb, "reset": 0xb, "streams": 0x1, "headers": 0xb,
                     "invalid": 0x1}, codes
    # Counted, and the ZEN serves the others as before.
    r = curl(zen, org_id, root, "--http2", f"https://good.test:{h2o.port}/hello")
    assert r.returncode == 0 and "over h2" in r.stdout, r.stderr
    port = next(json.loads(ln)["port"] for ln in zen.log.read_text().splitlines() if '"metrics listening"' in ln)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    floods = re.search(r'keyward_zen_h2_errors_total\{kind="flood",side="client"\} (\d+)', text)
    assert floods and float(floods.group(1)) >= 3, text[-3000:]


@pytest.mark.parametrize("client", ["--http2", "--http1.1"])
def test_encoded_and_dotted_paths_do_not_escape_a_blocked_prefix(
    zen: Zen, h2o: H2Origin, org: tuple[str, OrgRoot, Clients], client: str,  # noqa: F811
) -> None:
    """The origin decodes %70 to p, %2F to / and resolves dot segments; the ZEN matches the
    prefix on the path as the origin will read it, and on an absolute-form target's own host."""
    org_id, root, _ = org
    base = f"https://good.test:{h2o.port}"
    tries = ["/%70rivate/secret", "/public/../private/secret", "/private%2Fsecret", "/./private/secret"]
    before = len(h2o.seen)
    for path in tries:
        r = curl(zen, org_id, root, client, "--path-as-is", "-w", "\n%{http_code}", f"{base}{path}")
        assert r.returncode == 0 and r.stdout.endswith("\n403"), (path, r.stdout, r.stderr)
    if client == "--http1.1":  # the absolute form names its own authority (RFC 9112 3.2.2)
        r = curl(zen, org_id, root, client, "--request-target", f"https://good.test:{h2o.port}/private/secret",
                 "-H", "Host: elsewhere.test", "-w", "\n%{http_code}", f"{base}/")
        assert r.returncode == 0 and r.stdout.endswith("\n403"), r.stdout
    assert [p for _, _, p in h2o.seen[before:] if "private" in p.lower() or "%" in p] == []


def test_a_stream_its_client_does_not_read_stalls_no_other_stream(
    zen: Zen, h2o: H2Origin, org: tuple[str, OrgRoot, Clients],  # noqa: F811
) -> None:
    """Stream 1 downloads 20 MB and its client never opens that stream's window again (the
    connection's window it does, as a client reading other streams would): stream 3 on the
    same connection still gets its answer, while stream 1 holds at its 64 KiB window."""
    org_id, root, _ = org
    tls, conn = _raw_h2(zen, org_id, root, h2o.port)
    conn.send_headers(1, _headers(conn, "/big?bytes=20000000"), end_stream=True)
    tls.sendall(conn.data_to_send())
    got = {1: 0, 3: 0}
    ended: set[int] = set()
    asked = False
    tls.settimeout(15)
    while 3 not in ended:
        for ev in conn.receive_data(tls.recv(65536)):
            if isinstance(ev, h2.events.DataReceived):
                got[ev.stream_id] += len(ev.data)
                if ev.stream_id == 1:
                    conn.increment_flow_control_window(ev.flow_controlled_length)  # the connection's only
                else:
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                ended.add(ev.stream_id)
        if got[1] >= 65535 and not asked:  # stream 1's window is used up: now ask on stream 3
            conn.send_headers(3, _headers(conn, "/hello"), end_stream=True)
            asked = True
        tls.sendall(conn.data_to_send())
    assert got[3] == len("hello from good.test /hello over h2\n") and 1 not in ended
    assert got[1] == 65535  # no more than the window the client gave it
    tls.close()


def test_a_refusal_page_reaches_an_http2_only_client_in_http2(
    zen: Zen, web: Web, org: tuple[str, OrgRoot, Clients],  # noqa: F811
) -> None:
    """An origin whose certificate the ZEN does not trust (bad.test, self-signed): the 502 page
    comes in the client's protocol. A gRPC client offers only h2 and could read no HTTP/1.1 page;
    it reads UNAVAILABLE with the HTTP status, and curl --http2 reads the page over HTTP/2."""
    org_id, root, _ = org
    r = curl(zen, org_id, root, "--http2", "-w", "\n%{http_version} %{http_code}",
             f"https://bad.test:{web.bad_port}/")
    assert r.returncode == 0 and r.stdout.endswith("\n2 502") and "is not trusted" in r.stdout, r.stdout + r.stderr
    creds = grpc.ssl_channel_credentials(root.crt.read_bytes())
    with grpc.secure_channel(f"bad.test:{web.bad_port}", creds, options=[
            ("grpc.http_proxy", f"http://{org_id}:{PROXY_SECRET}@127.0.0.1:{zen.port}")]) as ch, \
            pytest.raises(grpc.RpcError) as e:
        say(ch, "anyone there?")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "502" in str(e.value.details()), e.value
