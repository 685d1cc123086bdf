"""``binserve profile``: measure the real engine's step times on this machine and fit a cost model.

    binserve profile --model .models/tiny-llama --json profiles/cpu-tiny.json

Runs a ShareGPT-shaped workload through the engine under each policy (so the fit sees prefill-heavy,
decode-heavy and mixed steps), times every step from ``schedule`` to ``complete``, and fits
``StepCostModel`` by least squares.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from cluster.bench.workload import WorkloadRequest
from cluster.sim.cost_model import StepCostModel, plan_features
from pipeline.config import EngineConfig
from pipeline.engine import Engine, RequestMetrics
from pipeline.request import SamplingParams


@dataclass(frozen=True)
class MeasuredRun:
    metrics: list[RequestMetrics]
    features: list[tuple[int, int, int, int]]
    step_times_s: list[float]


def run_measured(engine: Engine, requests: Sequence[WorkloadRequest]) -> MeasuredRun:
    """All requests arrive at once; returns per-request metrics and every step's features and time."""
    start_s = engine.clock()
    done: dict[str, RequestMetrics] = {}
    for i, r in enumerate(requests):
        engine.add_request(
            str(i),
            r.prompt_token_ids,
            SamplingParams(max_tokens=r.output_tokens, ignore_eos=True),
            arrival_s=start_s,
        )
    features, times = [], []
    while engine.has_unfinished:
        t0 = time.perf_counter()
        plan = engine.schedule()
        if plan.is_empty:
            continue
        outputs = engine.complete(plan, engine.runner.execute(plan))
        times.append(time.perf_counter() - t0)
        features.append(plan_features(plan))
        done.update((o.request_id, o.metrics) for o in outputs if o.metrics is not None)
    return MeasuredRun([done[str(i)] for i in range(len(requests))], features, times)


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
        run = run_measured(llm.engine, requests)
        features += run.features
        times += run.step_times_s
    source = f"binserve profile: {config.model.model_dir}, {len(times)} steps, policies {', '.join(policies)}"
    return StepCostModel.fit(features, times, source=source)
