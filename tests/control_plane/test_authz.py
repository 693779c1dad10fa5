"""control_plane.authz: the rule of which pools receive which orgs' keys (pure)."""

from __future__ import annotations

import pytest

from control_plane import authz

# (pool visibility, org bound to the pool, org private_zen_only) -> served
CASES = [
    ("public", False, False, True),
    ("public", False, True, False),
    ("public", True, False, True),   # bindings mean nothing to a public pool
    ("public", True, True, False),
    ("private", True, False, True),
    ("private", True, True, True),
    ("private", False, False, False),
    ("private", False, True, False),
]


@pytest.mark.parametrize("visibility,bound,private_only,served", CASES)
def test_pool_serves(visibility: str, bound: bool, private_only: bool, served: bool) -> None:
    assert authz.pool_serves(visibility, ("o-1",) if bound else ("o-2",), "o-1", private_only) is served
