"""Which refusals are audited one by one, and how the rest stay attributable (pure).

Every refused call is audited, but a flood must neither monopolize the
database's write lock nor hide anyone's refusal. So each caller (its SPIFFE
id) has its own budget: RATE rows a second, BURST at once. Past it, its
refusals are counted per (caller, action, org, outcome) and, once a WINDOW
has passed, written as one aggregate row per key with the count, under the
org's id, so that org's admin sees it in ListAuditEvents. One caller's flood
therefore cannot blind another caller, nor hide a refusal concerning one org
behind those of made-up orgs. Memory is bounded: at most MAX_CALLERS budgets
(least recently seen forgotten) and MAX_KEYS aggregate keys per window (the
rest counted under org "*").
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

RATE = 20.0
"""Individually audited refusals per second, per caller."""
BURST = 100.0
"""Individually audited refusals at once, per caller."""
WINDOW = 5.0
"""Seconds a caller's uncounted refusals are gathered before their aggregate rows are written."""
MAX_CALLERS = 10_000
MAX_KEYS = 1_000


@dataclass(frozen=True)
class Aggregate:
    caller: str
    action: str
    org_id: str
    outcome: str
    count: int
    first: float
    last: float

    def detail(self) -> str:
        org = f"org {self.org_id}" if self.org_id != "*" else "other orgs (too many to list)"
        return (f"{self.count} refused {self.action} call(s) by {self.caller} for {org} within "
                f"{self.last - self.first:.1f}s, not audited one by one (rate limit {RATE:g}/s per caller)")


@dataclass
class _Bucket:
    tokens: float
    last: float


@dataclass
class RefusalLedger:
    buckets: OrderedDict[str, _Bucket] = field(default_factory=OrderedDict)
    pending: dict[tuple[str, str, str, str], list[float]] = field(default_factory=dict)
    """(caller, action, org, outcome) -> [count, first, last]."""
    window_start: float | None = None

    def admit(self, caller: str, action: str, org_id: str, outcome: str, now: float) -> bool:
        """True: audit this refusal now, on its own. False: it is counted into an aggregate row."""
        b = self.buckets.pop(caller, None) or _Bucket(BURST, now)
        b.tokens = min(BURST, b.tokens + (now - b.last) * RATE)
        b.last = now
        self.buckets[caller] = b  # most recently seen last
        while len(self.buckets) > MAX_CALLERS:
            self.buckets.popitem(last=False)
        if b.tokens >= 1:
            b.tokens -= 1
            return True
        if self.window_start is None:
            self.window_start = now
        key = (caller, action, org_id or "", outcome)
        if key not in self.pending and len(self.pending) >= MAX_KEYS:
            key = (caller, action, "*", outcome)
        rec = self.pending.setdefault(key, [0.0, now, now])
        rec[0] += 1
        rec[2] = now
        return False

    def due(self, now: float, *, force: bool = False) -> list[Aggregate]:
        """The aggregate rows to write now (a window has passed, or ``force`` at shutdown)."""
        if not self.pending or self.window_start is None or (not force and now - self.window_start < WINDOW):
            return []
        out = [Aggregate(c, a, o, oc, int(n), first, last) for (c, a, o, oc), (n, first, last) in self.pending.items()]
        self.pending.clear()
        self.window_start = None
        return sorted(out, key=lambda g: (g.caller, g.org_id, g.action, g.outcome))
