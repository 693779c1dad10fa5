"""mitmproxy addon for the bench: bench.test resolves to 127.0.0.1 (the ZEN
gets the same through KEYWARD_ZEN_RESOLVE), keeping bench.test as SNI."""

from mitmproxy import connection  # type: ignore[import-not-found]
from mitmproxy.proxy import server_hooks  # type: ignore[import-not-found]


def server_connect(data: server_hooks.ServerConnectionHookData) -> None:
    host, port = data.server.address
    if host == "bench.test":
        data.server.address = ("127.0.0.1", port)
        data.server.sni = "bench.test"


_ = connection
