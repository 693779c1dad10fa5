"""The seeded fault campaign runs only under `make chaos` (KEYWARD_CHAOS_CYCLES set): a plain
`pytest` / `make test` collects nothing here."""

from __future__ import annotations

import os

if not os.environ.get("KEYWARD_CHAOS_CYCLES"):
    collect_ignore_glob = ["test_*.py"]
