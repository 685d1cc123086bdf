"""``binserve profile``: measure the real engine's step times on this machine and fit a cost model.

    binserve profile --model .models/tiny-llama --json profiles/cpu-tiny.json

Runs a ShareGPT-shaped workload through the engine under each policy (so the fit sees prefill-heavy,
decode-heavy and mixed steps), times every step from ``schedule`` to ``complete``, and fits
``StepCostModel`` by least squares.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from bench.replay import replay
from bench.sim.cost_model import StepCostModel
from bench.workload import WorkloadRequest
from pipeline.config import EngineConfig


def profile_engine(
    config: EngineConfig,
    requests: Sequence[WorkloadRequest],
    policies: Sequence[str] = ("sarathi", "prefill_first"),
) -> StepCostModel:
    from workers.llm import LLM

    features, times = [], []
    runner = None
    for policy in policies:
        llm = LLM(replace(config, scheduler=replace(config.scheduler, policy=policy)), runner=runner)
        runner = llm.runner  # load the weights once; the scheduler is new per policy
        run = replay(llm.engine, requests, desc=f"profile {policy}")
        features += run.features
        times += run.step_times_s
    source = f"binserve profile: {config.model.model_dir}, {len(times)} steps, policies {', '.join(policies)}"
    return StepCostModel.fit(features, times, source=source)
