"""control_plane.config: one reader of the environment, clear errors."""

from __future__ import annotations

import pytest

from control_plane.config import from_env
from control_plane.errors import ConfigError

BASE = {"KEYWARD_DB_DSN": "host=x", "KEYWARD_TLS_CERT_FILE": "c", "KEYWARD_TLS_KEY_FILE": "k",
        "KEYWARD_CLIENT_CA_FILE": "ca"}


def test_defaults() -> None:
    c = from_env(BASE)
    assert c.listen == "127.0.0.1:50051" and c.max_message_bytes == 1 << 20 and c.require_mlock


def test_missing_and_bad_values() -> None:
    with pytest.raises(ConfigError, match="KEYWARD_DB_DSN"):
        from_env({})
    with pytest.raises(ConfigError, match="not an integer"):
        from_env({**BASE, "KEYWARD_MAX_MESSAGE_BYTES": "lots"})
    with pytest.raises(ConfigError, match="out of range"):
        from_env({**BASE, "KEYWARD_DB_POOL_SIZE": "0"})
    with pytest.raises(ConfigError, match="boolean"):
        from_env({**BASE, "KEYWARD_REQUIRE_MLOCK": "maybe"})


def test_the_event_loop_is_uvloop_unless_asyncio_is_named() -> None:
    assert from_env(BASE).event_loop == "uvloop"
    assert from_env({**BASE, "KEYWARD_CA_EVENT_LOOP": " AsyncIO "}).event_loop == "asyncio"
    assert "KEYWARD_CA_EVENT_LOOP" not in from_env({**BASE, "KEYWARD_CA_EVENT_LOOP": "asyncio"}).extra
    with pytest.raises(ConfigError, match=r"^KEYWARD_CA_EVENT_LOOP=trio: uvloop or asyncio$"):
        from_env({**BASE, "KEYWARD_CA_EVENT_LOOP": "trio"})


def test_unknown_keys_are_reported() -> None:
    assert "KEYWARD_LISTN" in from_env({**BASE, "KEYWARD_LISTN": "x"}).extra

