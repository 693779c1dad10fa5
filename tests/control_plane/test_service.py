"""control_plane.service: pure helpers of the call wrapper."""

from __future__ import annotations

import pytest


def test_one_identity_has_at_most_two_writes_in_flight() -> None:
    from control_plane.errors import ResourceExhausted
    from control_plane.limits import Slots
    from control_plane.service import MAX_CONCURRENT_WRITES, _writes

    assert MAX_CONCURRENT_WRITES == 2 and _writes.limit == MAX_CONCURRENT_WRITES
    w = Slots(_writes.what, _writes.limit, _writes.advice)
    held = [w.take("spiffe://keyward/org-admin/acme") for _ in range(MAX_CONCURRENT_WRITES)]
    with pytest.raises(ResourceExhausted, match="retry when one has finished"):
        w.take("spiffe://keyward/org-admin/acme")
    assert w.take("spiffe://keyward/org-admin/globex")  # another tenant is not affected
    w.give(held[0])
    assert w.take("spiffe://keyward/org-admin/acme")  # one finished: room again
