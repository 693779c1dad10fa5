"""common.ids: one form of an org id and a pool name, for the CA, the ZEN, the CLI and the CRDs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from common.ids import ID_PATTERN, is_id

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("value,ok", [
    ("acme", True), ("a1-b2", True), ("abc", True), ("a" * 63, True),
    ("ab", False), ("a" * 64, False), ("1acme", False), ("acme-", False), ("Acme", False), ("ac_me", False),
    ("acme\n", False), ("", False),
])
def test_the_form(value: str, ok: bool) -> None:
    from control_plane.errors import InvalidArgument
    from control_plane.identity import check_id

    assert is_id(value) is ok
    if ok:
        assert check_id(value, "org_id") == value
    else:
        with pytest.raises(InvalidArgument, match="3-63 lowercase letters"):
            check_id(value, "org_id")


def test_the_crd_schemas_use_the_same_pattern() -> None:
    """The manifests cannot import Python: their OpenAPI patterns are held to it here."""
    files = [ROOT / "k8s/keyward.yaml", ROOT / "helm/keyward/crds/zenpools.keyward.io.yaml"]
    found = [m for f in files for m in re.findall(r'pattern: "?\^([^$"]+)\$"?', f.read_text())]
    assert found and all(p == ID_PATTERN for p in found), found
