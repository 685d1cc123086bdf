"""Where should the prompt-only predictor run? Time a prediction as the ingress would see it, two ways.

    binserve predictor overhead --num-calls 50 --json out/predictor_overhead.json

- ``in_process``: ``LengthPredictor.predict([prompt])`` in the caller's process (the ingress replica
  holding its own copy of the predictor), one prompt at a time, and a batch of 16 concurrent prompts.
- ``deployment``: ``await handle.predict.remote(prompt)`` on the ``LengthPredictorDeployment`` (its own
  Serve replica, ``@serve.batch`` with its batching window), one call at a time and 16 concurrent calls.

Each figure is the median over ``num_calls`` calls of the wall time the caller waits, in milliseconds.
Ray starts a local cluster here (one CPU for the predictor replica) and shuts it down after.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

CONCURRENCY = 16


def _prompts(num: int) -> list[str]:
    from bench.workload import read_sharegpt

    return [p["prompt"] for p in read_sharegpt()[:num]]


def time_in_process(predictor_dir: Path | None, num_calls: int) -> dict[str, float]:
    import torch

    from cluster.predictor import LengthPredictor

    torch.set_num_threads(1)
    predictor = LengthPredictor.load(predictor_dir)
    prompts = _prompts(num_calls * CONCURRENCY)
    predictor.predict(prompts[:CONCURRENCY])  # warm-up
    single, batched = [], []
    for call in range(num_calls):
        start = time.perf_counter()
        predictor.predict([prompts[call]])
        single.append((time.perf_counter() - start) * 1e3)
        batch = prompts[call * CONCURRENCY : (call + 1) * CONCURRENCY]
        start = time.perf_counter()
        predictor.predict(batch)
        batched.append((time.perf_counter() - start) * 1e3)
    return {"p50_ms_one_call": statistics.median(single), "p50_ms_16_concurrent": statistics.median(batched)}


def time_deployment(
    predictor_dir: Path | None, num_calls: int, batch_wait_timeout_s: float
) -> dict[str, float]:
    import ray
    from ray import serve

    from cluster.config import PredictorConfig
    from cluster.predictor_deployment import LengthPredictorDeployment

    prompts = _prompts(num_calls * CONCURRENCY)
    config = PredictorConfig(
        path=None if predictor_dir is None else str(predictor_dir), batch_wait_timeout_s=batch_wait_timeout_s
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        app = LengthPredictorDeployment.options(ray_actor_options={"num_cpus": 1}).bind(config)
        handle = serve.run(app, name="predictor-overhead", route_prefix=None)

        async def measure() -> dict[str, float]:
            await handle.predict.remote(prompts[0])  # warm-up
            single, concurrent = [], []
            for call in range(num_calls):
                start = time.perf_counter()
                await handle.predict.remote(prompts[call])
                single.append((time.perf_counter() - start) * 1e3)
                batch = prompts[call * CONCURRENCY : (call + 1) * CONCURRENCY]
                start = time.perf_counter()
                await asyncio.gather(*(handle.predict.remote(p) for p in batch))
                concurrent.append((time.perf_counter() - start) * 1e3)
            return {
                "p50_ms_one_call": statistics.median(single),
                "p50_ms_16_concurrent": statistics.median(concurrent),
            }

        return asyncio.run(measure())
    finally:
        serve.shutdown()
        ray.shutdown()


def measure_overhead(predictor_dir: Path | None, num_calls: int, batch_wait_timeout_s: float) -> dict:
    if num_calls < 1:
        raise ValueError(f"num_calls: must be at least 1, got {num_calls}")
    return {
        "in_process": time_in_process(predictor_dir, num_calls),
        "deployment": time_deployment(predictor_dir, num_calls, batch_wait_timeout_s),
        "batch_wait_timeout_s": batch_wait_timeout_s,
        "num_calls": num_calls,
    }
