"""The DSNs the store derives from KEYWARD_DB_DSN: the read-write one over every server, and one
per server (any role) for key reads, each server tried on its own (control_plane/store/tx.py)."""

from __future__ import annotations

import pytest
from psycopg.conninfo import conninfo_to_dict

from control_plane.errors import ConfigError
from control_plane.store.tx import Database


def test_one_dsn_per_server_with_its_host_and_port_and_any_role() -> None:
    rw, servers = Database.derive_dsns(
        "host=h0,h1,h2 port=5432,5433,5434 dbname=keyward user=keyward target_session_attrs=prefer-standby")
    assert conninfo_to_dict(rw)["target_session_attrs"] == "read-write"
    assert conninfo_to_dict(rw)["host"] == "h0,h1,h2"
    assert [name for name, _ in servers] == ["h0:5432", "h1:5433", "h2:5434"]
    for i, (_, dsn) in enumerate(servers):
        d = conninfo_to_dict(dsn)
        assert (d["host"], d["port"], d["dbname"]) == (f"h{i}", str(5432 + i), "keyward")
        assert "target_session_attrs" not in d
        assert d["tcp_user_timeout"] == "5000"  # a cut-off server is noticed on these too


def test_one_port_for_every_server_and_hostaddr_lists() -> None:
    _, servers = Database.derive_dsns("host=a,b hostaddr=10.0.0.1,10.0.0.2 port=6000 dbname=k")
    assert [name for name, _ in servers] == ["a:6000", "b:6000"]
    assert conninfo_to_dict(servers[1][1])["hostaddr"] == "10.0.0.2"
    _, single = Database.derive_dsns("dbname=k")  # libpq's defaults: one server
    assert [name for name, _ in single] == ["localhost:5432"]


def test_a_port_list_that_does_not_match_the_hosts_is_refused() -> None:
    with pytest.raises(ConfigError, match="3 servers but 2 port values"):
        Database.derive_dsns("host=a,b,c port=1,2 dbname=k")
