"""One pipeline stage: a contiguous layer range of the model and its share of the paged KV cache.

    worker = StageWorker(ModelConfig("/tmp/tiny"), layer_range=(0, 2))    # or StageActor.remote(...)
    worker.load(CacheConfig(num_blocks=worker.kv_capacity_blocks(CacheConfig())))
    handoff = worker.forward(plan)                                        # hidden states for stage 1

Every stage receives the whole ``StepPlan`` (it builds its own attention metadata from it); the first
embeds the plan's tokens, the others take the previous stage's ``Handoff``; the last samples and
returns a ``MicroBatchResult``. Each stage adds the time it spent computing the micro-batch to what it
hands on, so the driver learns every stage's busy time from the result without asking the stages.

Loading is two calls, not one constructor, because every stage must hold the same number of KV blocks
(the scheduler keeps one block table per request): the pipeline asks each stage what it could hold,
then loads them all with the minimum.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import ray
import torch

from pipeline.config import CacheConfig, ModelConfig
from pipeline.plan import StepOutput, StepPlan
from workers.checkpoint import load_config
from workers.partition import stage_parameters
from workers.runner import ModelRunner, kv_capacity_blocks, resolve_device, resolve_dtype


@dataclass(frozen=True)
class Handoff:
    """What a stage sends the next one: hidden states and the busy time of the stages so far."""

    hidden: torch.Tensor  # (T, hidden) for the plan's T tokens
    stage_busy_s: tuple[float, ...]


@dataclass(frozen=True)
class MicroBatchResult:
    """What the last stage returns to the driver for one micro-batch."""

    output: StepOutput
    stage_busy_s: tuple[float, ...]
    """Seconds each stage spent computing this micro-batch, first stage first."""


class StageWorker:
    def __init__(self, model: ModelConfig, layer_range: tuple[int, int], torch_threads: int = 1) -> None:
        # One intra-op thread per stage on CPU: a stage per core; more threads only spin against each other.
        torch.set_num_threads(torch_threads)
        self.model = model
        self.layer_range = layer_range
        self.runner: ModelRunner | None = None

    def kv_capacity_blocks(self, cache: CacheConfig) -> int:
        """KV blocks this stage could hold under ``cache``'s budget, before anything is loaded.

        The same rule as ``ModelRunner``'s own sizing: the CPU budget is per stage; on CUDA a share of
        the memory left once this stage's weights are in."""
        hf_config = load_config(self.model.model_dir)
        device = resolve_device(self.model.device)
        dtype = resolve_dtype(self.model.dtype, device)
        start, end = self.layer_range
        weight_bytes = stage_parameters(hf_config, self.layer_range) * dtype.itemsize
        return kv_capacity_blocks(
            hf_config, end - start, cache, device, dtype, weight_bytes_to_load=weight_bytes
        )

    def pid(self) -> int:
        return os.getpid()

    def load(self, cache: CacheConfig) -> int:
        """Load the weights and allocate the KV pool; returns the vocabulary size (for the engine)."""
        self.runner = ModelRunner(self.model, cache, self.layer_range)
        return self.runner.vocab_size

    def forward(self, plan: StepPlan, upstream: Handoff | None = None) -> Handoff | MicroBatchResult:
        assert self.runner is not None, "load() first"
        start_s = time.perf_counter()
        out = self.runner.forward_stage(plan, None if upstream is None else upstream.hidden)
        if self.runner.device.type == "cuda":
            # Kernels are asynchronous: wait for them so the busy time is the stage's real compute.
            torch.cuda.synchronize(self.runner.device)
        busy_s = (*(upstream.stage_busy_s if upstream else ()), time.perf_counter() - start_s)
        if isinstance(out, StepOutput):
            return MicroBatchResult(out, busy_s)
        return Handoff(out, busy_s)


# The actor form; resources and placement are given per stage with ``.options`` (see pipeline_runner).
StageActor = ray.remote(StageWorker)
