"""control_plane.refusals: every refusal stays attributable, whatever the flood."""

from __future__ import annotations

from control_plane import refusals
from control_plane.refusals import RefusalLedger


def test_budgets_are_per_caller_and_the_rest_is_aggregated_per_org() -> None:
    led = RefusalLedger()
    flood, other = "spiffe://k/zen-pool/public", "spiffe://k/zen-pool/edge"
    admitted = sum(led.admit(flood, "GetKeyPair", f"made-up-{i}", "PERMISSION_DENIED", 0.0) for i in range(150))
    assert admitted == refusals.BURST
    # The flooding caller's refusal concerning a real org is counted under that org...
    assert not led.admit(flood, "GetKeyPair", "bank", "PERMISSION_DENIED", 0.0)
    # ...and another caller is not slowed by the flood at all.
    assert led.admit(other, "GetKeyPair", "bank", "PERMISSION_DENIED", 0.0)
    assert led.due(refusals.WINDOW - 0.1) == []  # the window is still open
    rows = led.due(refusals.WINDOW)
    bank = [r for r in rows if r.org_id == "bank"]
    assert len(bank) == 1 and bank[0].caller == flood and bank[0].count == 1
    assert "for org bank" in bank[0].detail() and "rate limit" in bank[0].detail()
    assert sum(r.count for r in rows) == 150 - refusals.BURST + 1
    assert led.due(refusals.WINDOW * 3) == []  # written once


def test_memory_is_bounded() -> None:
    led = RefusalLedger()
    for i in range(refusals.MAX_CALLERS + 50):
        led.admit(f"caller-{i}", "GetKeyPair", "x", "PERMISSION_DENIED", 0.0)
    assert len(led.buckets) == refusals.MAX_CALLERS
    c = "spiffe://k/zen-pool/public"
    for i in range(int(refusals.BURST) + refusals.MAX_KEYS + 500):
        led.admit(c, "GetKeyPair", f"org-{i}", "PERMISSION_DENIED", 1.0)
    assert len(led.pending) <= refusals.MAX_KEYS + 1
    rows = led.due(1.0, force=True)
    assert any(r.org_id == "*" and r.count == 500 for r in rows)
