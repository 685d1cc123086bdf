"""A runner that costs (almost) nothing, so a benchmark measures the serving path alone. Benchmarks only:
no served config selects it; ``deploy/bench-path.yaml`` builds its application with ``build_app`` below.

    runner = PathRunner(step_s=0.002, num_blocks=65536, vocab_size=8192)
    engine = Engine(runner, scheduler)          # every step takes step_s, whatever its batch

Each plan completes ``step_s`` after it was submitted (a fast accelerator's step: the engine thread
sleeps, releasing the GIL, as it would while a GPU works) and samples one deterministic token per
sampling chunk, a function of its position only. The batch is the scheduler's (``max_num_seqs``); the KV
cache is bookkeeping only, so ``num_blocks`` can be large.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Any

from pipeline.config import EngineConfig, check_range
from pipeline.plan import StepOutput, StepPlan

FIRST_TOKEN_ID = 1000
"""Tokens cycle from here: ordinary word pieces of both served tokenizers, not special tokens."""
NUM_CYCLED_TOKENS = 4096


def path_token(position: int, vocab_size: int) -> int:
    """The token the path runner samples at ``position`` (deterministic, never a low special id)."""
    span = min(NUM_CYCLED_TOKENS, vocab_size - FIRST_TOKEN_ID)
    return FIRST_TOKEN_ID + (position * 7) % span


class PathRunner:
    """``pipeline.engine.Runner`` without a model: each step takes ``step_s`` and costs no CPU."""

    depth = 1

    def __init__(self, step_s: float, num_blocks: int, vocab_size: int) -> None:
        if vocab_size <= FIRST_TOKEN_ID:
            raise ValueError(f"vocab_size: must be > {FIRST_TOKEN_ID} for the path runner, got {vocab_size}")
        self.step_s = step_s
        self.num_blocks = num_blocks
        self.vocab_size = vocab_size
        self._pending: collections.deque[tuple[StepPlan, float]] = collections.deque()

    def submit(self, plan: StepPlan) -> None:
        self._pending.append((plan, time.perf_counter() + self.step_s))

    def collect(self) -> StepOutput:
        plan, due_s = self._pending.popleft()
        wait_s = due_s - time.perf_counter()
        if wait_s > 0:
            time.sleep(wait_s)
        sampled = tuple(path_token(c.end_pos, self.vocab_size) for c in plan.sampling_chunks)
        return StepOutput(plan.step_id, sampled)


@dataclass(frozen=True)
class PathRunnerConfig:
    """The path runner of every engine replica (``path_runner:`` in ``deploy/bench-path.yaml``)."""

    step_s: float = 0.002
    """Seconds each step takes, whatever its batch (0.002: a small model's decode step on a GPU)."""
    num_blocks: int = 65536
    """KV blocks the scheduler may hand out (bookkeeping only: 256 streams of 4,096 tokens need 65,536)."""

    def __post_init__(self) -> None:
        check_range("step_s", self.step_s, 0.0, 10.0)
        check_range("num_blocks", self.num_blocks, 1)

    def __call__(self, engine: EngineConfig) -> PathRunner:
        """The ``RunnerFactory`` the engine replicas call (in their own processes)."""
        from workers.checkpoint import load_config

        return PathRunner(self.step_s, self.num_blocks, load_config(engine.model.model_dir).vocab_size)


def build_app(args: dict[str, Any]):  # -> ray.serve.Application
    """Serve's application builder for ``import_path: bench.path_runner:build_app``: binserve's own
    application (``args`` as ``cluster.app.build_app`` takes them) with a ``path_runner`` section."""
    from cluster.app import build_application
    from cluster.config import AppConfig, parse_section

    args = dict(args)
    runner = parse_section(PathRunnerConfig, args.pop("path_runner", None), "path_runner")
    return build_application(AppConfig.from_args(args), runner_factory=runner)
