"""Benchmarks, the papers' experiments, workloads and the simulator: tools around the serving code."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(path: str | Path | None, report: dict) -> None:
    """Write a benchmark's JSON report to ``path`` (if given) and say where."""
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {path}")
