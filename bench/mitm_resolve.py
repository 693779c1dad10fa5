"""mitmproxy addon for the bench: bench.test and every name below it resolve to
127.0.0.1 (the ZEN gets the same through KEYWARD_ZEN_RESOLVE=*.bench.test=127.0.0.1),
keeping the requested name as SNI."""

from mitmproxy import connection  # type: ignore[import-not-found]
from mitmproxy.proxy import server_hooks  # type: ignore[import-not-found]

DOMAIN = "bench.test"


def server_connect(data: server_hooks.ServerConnectionHookData) -> None:
    host, port = data.server.address
    name = str(host).lower().rstrip(".")
    if name == DOMAIN or name.endswith("." + DOMAIN):
        data.server.address = ("127.0.0.1", port)
        data.server.sni = name


_ = connection
