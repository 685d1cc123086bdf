"""Step times over a grid of decode and prefill cells, fitted into the simulator's step-cost profile.

Each cell is one ``StepPlan`` run through ``ModelRunner.forward_stage`` (attention metadata, every layer,
``lm_head`` and sampling: the engine's whole step below the scheduler), timed end to end over
``num_steps`` runs after warm-up; the sampled tokens' ``.tolist()`` synchronises the device, so
wall-clock time is the step's time. Cells:

- decode: ``batch`` single-token decodes at ``context`` tokens each;
- prefill: one chunk of ``chunk`` tokens from position 0, and as the last chunk of a ``context``-token
  prompt (the path through the paged cache that a later SARATHI chunk takes);
- mixed: decodes plus one chunk in the same step, as SARATHI runs them.

Block tables are drawn from a shuffled pool (as a long-running engine's free list leaves them). A cell
whose blocks do not fit the KV pool beside the weights is skipped and recorded with the reason. The
medians are fitted by ``StepCostModel.fit`` (the simulator's own procedure) on the cells' features.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import asdict, dataclass

from bench.gpu.plan import CheckPlan
from bench.sim.cost_model import StepCostModel, plan_features
from pipeline.plan import ScheduledChunk, StepPlan
from pipeline.request import SamplingParams


@dataclass(frozen=True)
class Cell:
    kind: str  # "decode", "prefill" or "mixed": what the row of the report is
    num_decodes: int
    context_tokens: int
    """Context of every decode; for a prefill chunk, the position it ends at."""
    chunk_tokens: int

    @property
    def label(self) -> str:
        parts = []
        if self.num_decodes:
            parts.append(f"{self.num_decodes} decodes @ {self.context_tokens}")
        if self.chunk_tokens:
            end = self.context_tokens if self.kind == "prefill" else self.chunk_tokens
            parts.append(f"chunk {self.chunk_tokens} ending @ {end}")
        return " + ".join(parts)

    def num_blocks(self, block_size: int) -> int:
        decode_blocks = self.num_decodes * -(-self.context_tokens // block_size)
        chunk_end = self.context_tokens if self.kind == "prefill" else self.chunk_tokens
        return decode_blocks + (-(-chunk_end // block_size) if self.chunk_tokens else 0)


def grid(plan: CheckPlan) -> list[Cell]:
    cells = [Cell("decode", b, c, 0) for c in plan.context_tokens for b in plan.decode_batches]
    longest = max(plan.context_tokens)
    for chunk in plan.chunk_tokens:
        cells.append(Cell("prefill", 0, chunk, chunk))
        if chunk < longest:
            cells.append(Cell("prefill", 0, longest, chunk))
    cells += [Cell("mixed", m.num_decodes, m.context_tokens, m.chunk_tokens) for m in plan.mixed_cells]
    return cells


def cell_plan(cell: Cell, block_size: int, num_blocks: int, vocab_size: int, seed: int = 0) -> StepPlan:
    """The cell as a ``StepPlan``: decodes first, then the chunk (the order the scheduler emits)."""
    rng = random.Random(seed)
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    greedy = SamplingParams(max_tokens=1 << 20, ignore_eos=True)
    chunks = []
    per_decode = -(-cell.context_tokens // block_size)
    for i in range(cell.num_decodes):
        blocks = tuple(pool[:per_decode])
        del pool[:per_decode]
        chunks.append(
            ScheduledChunk(
                f"d{i}",
                (rng.randrange(vocab_size),),
                cell.context_tokens - 1,
                blocks,
                greedy,
                0,
                is_decode=True,
            )
        )
    if cell.chunk_tokens:
        end = cell.context_tokens if cell.kind == "prefill" else cell.chunk_tokens
        blocks = tuple(pool[: -(-end // block_size)])
        ids = tuple(rng.randrange(vocab_size) for _ in range(cell.chunk_tokens))
        chunks.append(ScheduledChunk("p", ids, end - cell.chunk_tokens, blocks, greedy, 0))
    return StepPlan(step_id=0, chunks=tuple(chunks))


def time_plan(runner, plan: StepPlan, num_steps: int, num_warmup: int) -> list[float]:  # noqa: ANN001
    for _ in range(num_warmup):
        runner.forward_stage(plan)
    times = []
    for _ in range(num_steps):
        start = time.perf_counter()
        runner.forward_stage(plan)  # returns after the sampled tokens reach the host
        times.append(time.perf_counter() - start)
    return times


def measure_grid(runner, plan: CheckPlan) -> dict:  # noqa: ANN001 (a workers.runner.ModelRunner)
    cells, skipped = [], []
    for cell in grid(plan):
        needed = cell.num_blocks(runner.block_size)
        if needed > runner.num_blocks:
            reason = f"KV for {cell.label} needs {needed} blocks; {runner.num_blocks} fit beside the weights"
            skipped.append({**asdict(cell), "label": cell.label, "skipped": reason})
            print(f"  {cell.label}: skipped ({reason})", flush=True)
            continue
        step = cell_plan(cell, runner.block_size, runner.num_blocks, runner.vocab_size)
        times = time_plan(runner, step, plan.num_steps, plan.num_warmup)
        median_s = statistics.median(times)
        cells.append(
            {
                **asdict(cell),
                "label": cell.label,
                "features": list(plan_features(step)),
                "step_s_median": median_s,
                "step_s_min": min(times),
                "step_s_max": max(times),
            }
        )
        print(f"  {cell.label}: {median_s * 1e3:.2f} ms (min {min(times) * 1e3:.2f})", flush=True)
    return {"cells": cells, "skipped_cells": skipped}


def fit_profile(cells: list[dict], source: str) -> tuple[StepCostModel, dict]:
    """The step-cost model fitted to the cells' medians, and how far each cell is from it."""
    model = StepCostModel.fit(
        [tuple(c["features"]) for c in cells], [c["step_s_median"] for c in cells], source
    )
    errors = []
    for c in cells:
        predicted = model.base_s + sum(
            coef * x
            for coef, x in zip(
                (model.prefill_token_s, model.decode_token_s, model.kv_token_s, model.request_s),
                c["features"],
                strict=True,
            )
        )
        errors.append({"label": c["label"], "relative_error": predicted / c["step_s_median"] - 1.0})
    worst = max(abs(e["relative_error"]) for e in errors)
    return model, {"max_abs_relative_error": worst, "by_cell": errors}


def prefill_cost_per_token(cells: list[dict]) -> list[dict]:
    """Each prefill cell's step time per chunk token (what a SARATHI chunk costs per prompt token)."""
    return [
        {
            "chunk_tokens": c["chunk_tokens"],
            "ends_at": c["context_tokens"],
            "s_per_token": c["step_s_median"] / c["chunk_tokens"],
        }
        for c in cells
        if c["kind"] == "prefill"
    ]
