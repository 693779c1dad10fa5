"""common.env: one reading of each kind of setting for the CA, the ZEN and the operator."""

from __future__ import annotations

import pytest

from common import env
from common.env import SettingError

BOOLS = [("true", True), ("1", True), ("YES", True), (" on ", True),
         ("false", False), ("0", False), ("No", False), ("off", False)]


@pytest.mark.parametrize("raw,want", BOOLS)
def test_a_boolean_reads_the_same_everywhere(raw: str, want: bool) -> None:
    """KEYWARD_REQUIRE_MLOCK is read by the CA and the ZEN: through the same function, with the same
    default for unset and blank."""
    from control_plane.config import from_env as ca
    from data_plane.config import from_env as zen

    base = {"KEYWARD_DB_DSN": "x", "KEYWARD_TLS_CERT_FILE": "c", "KEYWARD_TLS_KEY_FILE": "k",
            "KEYWARD_CLIENT_CA_FILE": "a", "KEYWARD_ZEN_TLS_CERT_FILE": "c", "KEYWARD_ZEN_TLS_KEY_FILE": "k",
            "KEYWARD_ZEN_CA_TRUST_FILE": "t", "KEYWARD_MASTER_SECRET_FILE": "m"}
    assert env.boolean("X", raw) is want
    assert ca({**base, "KEYWARD_REQUIRE_MLOCK": raw}).require_mlock is want
    assert zen({**base, "KEYWARD_REQUIRE_MLOCK": raw}).require_mlock is want
    for unset in ({}, {"KEYWARD_REQUIRE_MLOCK": ""}, {"KEYWARD_REQUIRE_MLOCK": "  "}):
        assert ca({**base, **unset}).require_mlock is True and zen({**base, **unset}).require_mlock is True


def test_a_bad_value_is_one_line_naming_the_setting_in_every_process() -> None:
    from control_plane.config import from_env as ca
    from control_plane.errors import ConfigError
    from k8s.operator.config import OperatorConfig

    base = {"KEYWARD_DB_DSN": "x", "KEYWARD_TLS_CERT_FILE": "c", "KEYWARD_TLS_KEY_FILE": "k",
            "KEYWARD_CLIENT_CA_FILE": "a"}
    with pytest.raises(ConfigError, match=r"^KEYWARD_REQUIRE_MLOCK=maybe: not a boolean \(true or false\)$"):
        ca({**base, "KEYWARD_REQUIRE_MLOCK": "maybe"})
    with pytest.raises(ConfigError, match=r"^KEYWARD_MAX_CALL_SECONDS=soon: not a number \(seconds\)$"):
        ca({**base, "KEYWARD_MAX_CALL_SECONDS": "soon"})
    with pytest.raises(ConfigError, match=r"^KEYWARD_METRICS_LISTEN=9464: not host:port"):
        ca({**base, "KEYWARD_METRICS_LISTEN": "9464"})  # used to fail later, in the metrics server, with a traceback
    assert ca({**base, "KEYWARD_METRICS_LISTEN": ""}).metrics_listen == ""  # empty: no endpoint
    with pytest.raises(SettingError, match=r"^KEYWARD_OPERATOR_INTERVAL=soon: not a number \(seconds\)$"):
        OperatorConfig.from_env({"KEYWARD_OPERATOR_INTERVAL": "soon"})
    with pytest.raises(SettingError, match=r"^KEYWARD_PKI_CERT_DAYS=0: out of range 1\.\.825 \(days\)$"):
        OperatorConfig.from_env({"KEYWARD_PKI_CERT_DAYS": "0"})


@pytest.mark.parametrize("parse,raw,error", [
    (lambda n, r: env.integer(n, r, 1, 10), "lots", "X=lots: not an integer"),
    (lambda n, r: env.integer(n, r, 1, 10), "11", "X=11: out of range 1..10"),
    (lambda n, r: env.seconds(n, r, 0.5, 60), "nan", "X=nan: out of range 0.5..60 (seconds)"),
    (env.hostport, "8080", "X=8080: not host:port (a port from 0 to 65535)"),
    (env.hostport, "[::1:8080", "X=[::1:8080: an IPv6 host goes in brackets, [::1]:8080"),
    (env.address, "ca:0", "X=ca:0: not host:port (a port from 1 to 65535)"),
    (env.log_level, "loud", "X=loud: not one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    (env.event_loop, "trio", "X=trio: uvloop or asyncio"),
])
def test_errors_name_the_setting_and_the_value(parse: object, raw: str, error: str) -> None:
    with pytest.raises(SettingError) as e:
        parse("X", raw)  # type: ignore[operator]
    assert str(e.value) == error


def test_values_and_defaults() -> None:
    assert env.get({}, "X", 7, env.integer_in(1, 10)) == 7
    assert env.get({"X": " "}, "X", 7, env.integer_in(1, 10)) == 7
    assert env.get({"X": "3"}, "X", 7, env.integer_in(1, 10)) == 3
    assert env.seconds("X", "0.25", 0.1, 1) == 0.25
    assert env.hostport("X", "0.0.0.0:0") == "0.0.0.0:0" and env.address("X", "[::1]:50051") == "[::1]:50051"
    assert env.split_hostport(":9464") == (env.LOOPBACK, 9464)  # no host: loopback, never every interface
    assert env.split_hostport("[::1]:8080") == ("::1", 8080)
    assert env.log_level("X", " info ") == "INFO"
    assert env.event_loop("X", " UVLoop ") == "uvloop" and env.event_loop("X", "asyncio") == "asyncio"


def test_a_file_setting_names_the_file_and_why(tmp_path: object) -> None:
    from pathlib import Path

    d = Path(str(tmp_path))
    (d / "f").write_bytes(b"x")
    assert env.read_file("X_FILE", str(d / "f")) == b"x"
    with pytest.raises(SettingError, match=f"^X_FILE={d}/missing: no such file$"):
        env.read_file("X_FILE", str(d / "missing"))
    with pytest.raises(SettingError, match=f"^X_FILE={d}: is a directory$"):
        env.read_file("X_FILE", str(d))
