"""How well the simulator predicts the real engine on this machine: a benchmark, not a test, since both sides
are timings of a shared machine.

    binserve bench sim-agreement --model .models/smollm2-135m-instruct --repeats 3 --json out/sim_agreement.json

Each repeat fits a step-cost model by ``binserve profile``'s procedure on one workload (a burst, under sarathi
and prefill_first), then replays a *different* workload (other prompts, Poisson arrivals, continuous
batching) on the real engine and in the simulator, and records the simulator's error on throughput and mean
completion time. Repeats alternate which of the two real runs comes first, so a drift in the machine's speed
shows up as spread rather than as a bias. The report gives every repeat and the median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass

from bench.replay import MeasuredRun, replay
from bench.request_stats import summarize
from bench.sim.cost_model import StepCostModel
from bench.sim.simulator import ClusterSimulator, SimConfig, SimRequest


@dataclass(frozen=True)
class Agreement:
    """The simulator against one real run of the same workload."""

    real_output_tokens_per_s: float
    sim_output_tokens_per_s: float
    real_mean_jct_s: float
    sim_mean_jct_s: float

    @property
    def throughput_error(self) -> float:
        return self.sim_output_tokens_per_s / self.real_output_tokens_per_s - 1.0

    @property
    def mean_jct_error(self) -> float:
        return self.sim_mean_jct_s / self.real_mean_jct_s - 1.0


def simulate_like(llm, workload, real: MeasuredRun, cost_model: StepCostModel) -> Agreement:
    """The simulator under ``cost_model``, on the engine's own configuration and ``workload`` (arrival times
    included), against the ``real`` replay of it."""
    config = llm.config
    sim = ClusterSimulator(
        SimConfig(
            scheduler=config.scheduler,
            num_blocks=llm.runner.num_blocks,
            max_model_len=config.model.max_model_len,
        ),
        cost_model,
    )
    simulated = sim.run([SimRequest(r.arrival_s, len(r.prompt_token_ids), r.output_tokens) for r in workload])
    real_summary, sim_summary = summarize(real.metrics), summarize(simulated)
    return Agreement(
        real_output_tokens_per_s=real_summary.output_tokens_per_s,
        sim_output_tokens_per_s=sim_summary.output_tokens_per_s,
        real_mean_jct_s=real_summary.mean_jct_s,
        sim_mean_jct_s=sim_summary.mean_jct_s,
    )


def run_agreement(model_dir: str, repeats: int, num_requests: int, max_output_tokens: int) -> dict:
    from bench.sim.profile import profile_engine
    from bench.workload import poisson_arrivals, sharegpt_requests, with_arrivals
    from pipeline.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from workers.llm import LLM

    config = EngineConfig(
        ModelConfig(model_dir, max_model_len=512),
        cache=CacheConfig(kv_cache_bytes=64 * 2**20),
        scheduler=SchedulerConfig(chunk_size=128, max_num_seqs=8),
    )
    llm = LLM(config)
    calibration = sharegpt_requests(
        llm.tokenizer, num_requests, seed=1, max_prompt_tokens=192, max_output_tokens=max_output_tokens
    )
    workload = sharegpt_requests(
        llm.tokenizer, num_requests, seed=2, max_prompt_tokens=192, max_output_tokens=max_output_tokens
    )
    workload = with_arrivals(workload, poisson_arrivals(len(workload), rate_per_s=4.0, seed=2))
    runs = []
    for repeat in range(repeats):
        load_before = os.getloadavg()[0]
        # Alternate the order of the two measurements so the machine's drift is not always on one side.
        if repeat % 2 == 0:
            cost_model = profile_engine(config, calibration)
            real = replay(llm.engine, workload)
        else:
            real = replay(llm.engine, workload)
            cost_model = profile_engine(config, calibration)
        agreement = simulate_like(llm, workload, real, cost_model)
        runs.append(
            {
                "repeat": repeat,
                "calibration_first": repeat % 2 == 0,
                "base_step_ms": 1000 * cost_model.base_s,
                **agreement.__dict__,
                "throughput_error": agreement.throughput_error,
                "mean_jct_error": agreement.mean_jct_error,
                "load_average": [load_before, os.getloadavg()[0]],
            }
        )
        print(
            f"repeat {repeat}: throughput {agreement.sim_output_tokens_per_s:.1f} simulated vs "
            f"{agreement.real_output_tokens_per_s:.1f} real ({agreement.throughput_error:+.1%}), mean JCT "
            f"{agreement.sim_mean_jct_s:.2f} vs {agreement.real_mean_jct_s:.2f} s ({agreement.mean_jct_error:+.1%}),"
            f" load {load_before:.2f}"
        )
    return {
        "benchmark": "sim-agreement",
        "model": os.path.basename(os.path.normpath(model_dir)),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "num_requests": num_requests,
        "max_output_tokens": max_output_tokens,
        "runs": runs,
        "median_throughput_error": statistics.median(r["throughput_error"] for r in runs),
        "median_mean_jct_error": statistics.median(r["mean_jct_error"] for r in runs),
        "target": "within 10% on throughput and mean JCT (median over repeats)",
    }


def cmd_sim_agreement(args: argparse.Namespace) -> int:
    import torch

    from bench import write_report

    torch.set_num_threads(args.torch_threads)
    report = run_agreement(args.model, args.repeats, args.num_requests, args.max_output_tokens)
    print(
        f"median error: throughput {report['median_throughput_error']:+.1%}, "
        f"mean JCT {report['median_mean_jct_error']:+.1%} ({report['target']})"
    )
    write_report(args.json, report)
    return 0


def register(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "sim-agreement", help="the simulator's error against the real engine, over alternating repeats"
    )
    p.add_argument("--model", required=True, help="checkpoint directory (e.g. .models/smollm2-135m-instruct)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--max-output-tokens", type=int, default=40)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--json", default="out/sim_agreement.json")
    p.set_defaults(func=cmd_sim_agreement)
