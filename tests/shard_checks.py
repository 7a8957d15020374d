"""Comparisons of labeled output directories shared by the engine, resume and crash tests."""

from __future__ import annotations

import json
from pathlib import Path


def stats_without_timings(out: Path) -> dict[str, dict]:
    """Every shard's stats JSON minus ``timings``, the one engine- and run-dependent key."""
    stats = {}
    for p in sorted(out.glob("*.stats.json")):
        s = json.loads(p.read_text())
        s.pop("timings")
        stats[p.name] = s
    return stats
