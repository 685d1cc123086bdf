"""``binserve bench overhead-summary``: alternating ``bench serve`` runs combined per configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import overhead


def _run(tmp_path: Path, name: str, overhead_s: float, predict_s: float) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(
        json.dumps(
            {"ingress_overhead": {"num_calls": 12, "p50_ttft_overhead_s": overhead_s, "p50_predict_s": predict_s}}
        )
    )
    return str(path)


def test_runs_are_grouped_by_name_in_order_and_judged_by_the_best_median(tmp_path: Path) -> None:
    runs = [
        ("a", _run(tmp_path, "a1", 0.016, 0.006)),
        ("b", _run(tmp_path, "b1", 0.004, 0.001)),
        ("a", _run(tmp_path, "a2", 0.012, 0.005)),
        ("b", _run(tmp_path, "b2", 0.008, 0.002)),
        ("a", _run(tmp_path, "a3", 0.020, 0.007)),
    ]
    result = overhead.summarise(runs)
    assert list(result["by_name"]) == ["a", "b"]
    assert result["by_name"]["a"]["overhead_p50_ms"] == [16.0, 12.0, 20.0]
    assert result["by_name"]["a"]["median_overhead_ms"] == 16.0
    assert result["by_name"]["b"]["median_overhead_ms"] == 6.0
    [target] = overhead.targets(result)
    assert target["value"] == 6.0 and target["met"] is False and "the best configuration: b" in target["target"]


def test_a_run_without_overhead_figures_is_named(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match=r"run: .*x.json has no ingress_overhead"):
        overhead.summarise([("x", str(path))])
