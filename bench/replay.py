"""Replay a workload through the real engine in real time and collect every request's metrics.

    run = replay(llm.engine, requests, predicted=[...], bins=[...])
    summarize(run.metrics)

Requests join when their ``arrival_s`` comes (all at once when every arrival is 0), with their output
length forced. Every step's plan features and wall time are logged, for ``binserve profile``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tqdm import tqdm

from bench.sim.cost_model import plan_features
from bench.workload import WorkloadRequest
from pipeline.engine import Engine, RequestMetrics
from pipeline.request import NewRequest, SamplingParams


@dataclass(frozen=True)
class MeasuredRun:
    metrics: list[RequestMetrics]
    """One per request, in workload order."""
    features: list[tuple[int, int, int, int]]
    step_times_s: list[float]


def replay(
    engine: Engine,
    requests: Sequence[WorkloadRequest],
    predicted: Sequence[int | None] | None = None,
    bins: Sequence[int] | None = None,
    desc: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> MeasuredRun:
    predicted = predicted or [None] * len(requests)
    bins = bins or [0] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
    start_s = engine.clock()
    done: dict[str, RequestMetrics] = {}
    features, times = [], []
    next_index = 0
    with tqdm(total=len(requests), desc=desc, unit="req", disable=desc is None, leave=False) as bar:
        while next_index < len(order) or engine.has_unfinished:
            now_s = engine.clock() - start_s
            while next_index < len(order) and requests[order[next_index]].arrival_s <= now_s:
                i = order[next_index]
                r = requests[i]
                params = SamplingParams(max_tokens=r.output_tokens, ignore_eos=True)
                new = NewRequest(str(i), tuple(r.prompt_token_ids), params, predicted[i], bins[i])
                engine.add_request(new, arrival_s=start_s + r.arrival_s)
                next_index += 1
            t0 = time.perf_counter()
            plan = engine.schedule()
            if plan.is_empty:
                if next_index < len(order):
                    sleep(max(0.0, min(0.001, requests[order[next_index]].arrival_s - now_s)))
                else:
                    sleep(0.0005)  # a dynamic batch waiting for its timeout
                continue
            engine.runner.submit(plan)  # one plan at a time: each step's time is measured alone
            outputs = engine.complete(plan, engine.runner.collect())
            times.append(time.perf_counter() - t0)
            features.append(plan_features(plan))
            for out in outputs:
                if out.metrics is not None:
                    done[out.request_id] = out.metrics
                    bar.update(1)
    return MeasuredRun([done[str(i)] for i in range(len(requests))], features, times)
