"""The CUDA readiness check in its CPU smoke mode, end to end: every part runs and the JSON holds its
figures. On a CPU in float32 the engine's greedy tokens must equal transformers' exactly."""

from __future__ import annotations

import json

import pytest

from bench.gpu_check import first_divergence, run_gpu_check
from tools.cli import main


def test_first_divergence() -> None:
    assert first_divergence((1, 2, 3), (1, 2, 3)) is None
    assert first_divergence((1, 2, 3), (1, 5, 3)) == 1
    assert first_divergence((1, 2), (1, 2, 3)) == 2


def test_without_cuda_the_full_check_asks_for_smoke() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match="--smoke"):
        run_gpu_check(smoke=False)


def test_smoke_check_runs_every_part(tiny_llama: str, tmp_path) -> None:
    out = tmp_path / "smoke.json"
    assert main(["bench", "gpu-check", "--smoke", "--model", tiny_llama, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "smoke" and report["ok"]
    parity = report["parity"]
    assert parity["all_equal"], [p["first_divergence"] for p in parity["prompts"]]
    assert all(len(p["ours"]) > 0 for p in parity["prompts"])
    [offline] = [report["offline"][str(n)] for n in report["plan"]["offline_requests"]]
    assert offline["engine"]["output_tokens"] == offline["hf"]["output_tokens"] > 0
    points = report["roofline"]["points"]
    assert [p["batch"] for p in points] == report["plan"]["roofline_batches"]
    assert all(p["ratio"] > 0 and p["bound"] in ("memory", "compute") for p in points)
