"""One shape's timing part: load it, time the grid, fit the profile, the roofline and the breakdown.

The runner is loaded once per shape (the 8B takes seconds to read); what comes after the grid (the fit,
the roofline fractions, the profiler's split) is guarded piece by piece, so a failure in one keeps the
others and the grid's raw cells.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.gpu.breakdown import peak_read_bytes_per_s, roofline_fractions, step_breakdown
from bench.gpu.plan import CheckPlan
from bench.gpu.steps import Cell, cell_plan, fit_profile, grid, measure_grid, prefill_cost_per_token
from pipeline.config import CacheConfig, ModelConfig
from workers.runner import ModelRunner


@dataclass(frozen=True)
class TimingSetup:
    shape_name: str
    model_dir: str
    num_parameters: int
    device: torch.device
    dtype: torch.dtype
    device_name: str
    profile_path: Path
    provenance: str
    """Device, torch and CUDA versions and the date, for the profile's ``source``."""


def load_runner(setup: TimingSetup, plan: CheckPlan) -> ModelRunner:
    if (
        setup.device.type == "cuda"
    ):  # the pool takes what fits beside the weights; cells beyond it are skipped
        cache = CacheConfig(gpu_memory_fraction=0.85)
    else:
        cache = CacheConfig(num_blocks=max(c.num_blocks(CacheConfig().block_size) for c in grid(plan)))
    dtype_name = str(setup.dtype).removeprefix("torch.")
    runner = ModelRunner(ModelConfig(setup.model_dir, dtype=dtype_name, device=str(setup.device)), cache)
    generator = torch.Generator(device=setup.device).manual_seed(0)
    for kv in runner.kv_caches:  # random keys and values, as a decode reads them (not zeros)
        kv.normal_(generator=generator)
    return runner


def _source(setup: TimingSetup, plan: CheckPlan, num_cells: int, num_skipped: int) -> str:
    return (
        f"MEASURED by `python -m bench.gpu_check` ({plan.mode}) on {setup.provenance}: {setup.shape_name} "
        f"({setup.num_parameters / 1e9:.2f}e9 parameters, random {str(setup.dtype).removeprefix('torch.')} "
        f"weights), ModelRunner.forward_stage medians of {num_cells} cells (decode batches "
        f"{', '.join(map(str, plan.decode_batches))} at contexts {', '.join(map(str, plan.context_tokens))}; "
        f"prefill chunks {', '.join(map(str, plan.chunk_tokens))}; mixed), {num_skipped} skipped (KV did not "
        "fit), fitted by StepCostModel.fit"
    )


def _fit(setup: TimingSetup, plan: CheckPlan, cells: list[dict], num_skipped: int) -> dict:
    model, quality = fit_profile(cells, "")
    source = _source(setup, plan, len(cells), num_skipped)
    model = dataclasses.replace(
        model, source=f"{source}; worst cell {quality['max_abs_relative_error']:.0%} off the fit"
    )
    setup.profile_path.parent.mkdir(parents=True, exist_ok=True)
    model.save(setup.profile_path)
    coefficients = dataclasses.asdict(model)
    print(
        f"  profile {setup.profile_path}: {json.dumps({k: v for k, v in coefficients.items() if k != 'source'})}"
    )
    return {"path": str(setup.profile_path), "coefficients": coefficients, "fit": quality}


def _breakdown(runner: ModelRunner, plan: CheckPlan) -> dict:
    context = max(plan.context_tokens)
    steps = {}
    for batch in plan.roofline_batches:
        cell = Cell("decode", batch, context, 0)
        if cell.num_blocks(runner.block_size) > runner.num_blocks:
            continue  # recorded among the grid's skipped cells
        step = step_breakdown(
            runner, cell_plan(cell, runner.block_size, runner.num_blocks, runner.vocab_size)
        )
        steps[cell.label] = step
        print(f"  breakdown {cell.label}: " + ", ".join(f"{k} {v:.0%}" for k, v in step["share"].items()))
    return {"steps": steps}


def timing_part(
    setup: TimingSetup, plan: CheckPlan, limits: dict | None, guarded: Callable[[Callable[[], dict]], dict]
) -> dict:
    """``limits``: the machine part's measured limits (None if it failed: no roofline fractions)."""
    start_s = time.perf_counter()
    runner = load_runner(setup, plan)
    result: dict = {"load_s": time.perf_counter() - start_s, "num_kv_blocks": runner.num_blocks}
    print(f"  loaded in {result['load_s']:.1f} s; KV pool {runner.num_blocks} blocks", flush=True)
    result.update(measure_grid(runner, plan))
    cells = result["cells"]
    result["prefill_cost_per_token"] = prefill_cost_per_token(cells)
    result["profile"] = guarded(lambda: _fit(setup, plan, cells, len(result["skipped_cells"])))
    if limits is None:
        result["roofline"] = {"ok": False, "error": "the machine part did not measure the device's limits"}
    else:
        peak = peak_read_bytes_per_s(setup.device_name)
        result["roofline"] = guarded(
            lambda: {"points": roofline_fractions(runner, cells, plan.roofline_batches, limits, peak)}
        )
    result["breakdown"] = guarded(lambda: _breakdown(runner, plan))
    return result
