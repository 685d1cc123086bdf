"""``binserve bench pipeline``: pipeline bubbles with SARATHI micro-batches against prefill-first ones.

    binserve bench pipeline --model .models/pp-bench --hidden-size 256 --num-layers 8 \\
        --pp 2 --num-requests 256 --rounds 2 --json pp-bench.json

One pipeline of ``--pp`` stage actors serves the same ShareGPT-shaped requests (output lengths forced,
EOS ignored) twice: with SARATHI micro-batches (decodes first, then prefill chunks up to the
``--chunk-size`` token budget) and with ``prefill_first`` ones (whole prompts; a micro-batch that can
admit a prompt does only prefills). ``pp_size`` micro-batches are in flight either way; only the
scheduler's policy differs. For each it reports throughput, the bubble fraction and every stage's
utilisation (``PipelineStats``), and the ratios between the two.

All requests arrive at once, but at most ``--max-num-seqs`` run, so a new prompt is admitted whenever
one finishes: after a ramp-up, prefills and decodes interleave as under steady online load. The
defaults size SARATHI's budget to that mix: about ``max_num_seqs / pp`` decodes per micro-batch plus
the prefill tokens that arrive with them (ShareGPT prompts are ~1.3x their outputs) fill 128 tokens,
so every micro-batch is full and costs the same.

``--hidden-size``/``--num-layers`` write a synthetic checkpoint of that size to ``--model`` first if the
directory has none: the 4-layer tiny test model is too small for a pipeline measurement, since the
fixed cost of a micro-batch (scheduling, channels) rivals its compute.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench import write_report
from bench.workload import WorkloadRequest, sharegpt_requests
from pipeline.config import EngineConfig
from pipeline.engine import Completion
from pipeline.request import SamplingParams

if TYPE_CHECKING:
    from workers.pipeline_runner import PipelineRunner, PipelineStats

POLICIES = ("sarathi", "prefill_first")
NUM_WARMUP_REQUESTS = 4


@dataclasses.dataclass(frozen=True)
class _Run:
    done: list[Completion]
    wall_s: float
    stats: PipelineStats


def _run_policy(config: EngineConfig, runner: PipelineRunner, requests: list[WorkloadRequest]) -> _Run:
    from workers.llm import build_engine

    engine = build_engine(config, runner)
    runner.reset_stats()
    start_s = time.perf_counter()
    done = engine.generate(*_inputs(requests))
    return _Run(done, time.perf_counter() - start_s, runner.stats())


def _inputs(requests: list[WorkloadRequest]) -> tuple[list[list[int]], list[SamplingParams]]:
    prompts = [list(r.prompt_token_ids) for r in requests]
    return prompts, [SamplingParams(max_tokens=r.output_tokens, ignore_eos=True) for r in requests]


def _summary(runs: list[_Run]) -> dict:
    """Totals over the rounds: throughput from summed tokens and time, bubbles from summed stage time."""
    from workers.pipeline_runner import PipelineStats

    stats = PipelineStats(
        num_micro_batches=sum(r.stats.num_micro_batches for r in runs),
        active_s=sum(r.stats.active_s for r in runs),
        stage_busy_s=tuple(map(sum, zip(*(r.stats.stage_busy_s for r in runs), strict=True))),
        max_in_flight=max(r.stats.max_in_flight for r in runs),
    )
    return {
        **_throughput([c for r in runs for c in r.done], sum(r.wall_s for r in runs)),
        "num_micro_batches": stats.num_micro_batches,
        "max_in_flight": stats.max_in_flight,
        "active_s": stats.active_s,
        "stage_busy_s": list(stats.stage_busy_s),
        "stage_utilisation": list(stats.stage_utilisation),
        "bubble_fraction": stats.bubble_fraction,
        "bubble_s": stats.bubble_s,
        "bubble_fraction_by_round": [r.stats.bubble_fraction for r in runs],
    }


def _throughput(done: list[Completion], wall_s: float) -> dict:
    num_output = sum(len(c.output_token_ids) for c in done)
    num_prompt = sum(len(c.prompt_token_ids) for c in done)
    tbts = [t for c in done for t in c.metrics.tbt_s]
    return {
        "wall_s": wall_s,
        "output_tokens_per_s": num_output / wall_s,
        "tokens_per_s": (num_prompt + num_output) / wall_s,
        "requests_per_s": len(done) / wall_s,
        "mean_ttft_s": statistics.fmean(c.metrics.ttft_s for c in done),
        "p50_tbt_s": statistics.median(tbts) if tbts else None,
        "num_preemptions": sum(c.metrics.num_preemptions for c in done),
    }


def _run_one_process(config: EngineConfig, requests: list[WorkloadRequest]) -> dict:
    """The same SARATHI run in one process with every layer: what the pipeline is compared with."""
    from workers.llm import LLM

    llm = LLM(dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, pp_size=1)))
    start_s = time.perf_counter()
    done = llm.engine.generate(*_inputs(requests))
    return _throughput(done, time.perf_counter() - start_s)


def _run_rounds(
    config: EngineConfig,
    runner: PipelineRunner,
    requests: list[WorkloadRequest],
    runs: dict[str, list[_Run]],
    num_rounds: int,
) -> None:
    try:
        _run_policy(config, runner, requests[:NUM_WARMUP_REQUESTS])  # first executions, allocator
        for _ in range(num_rounds):
            for policy in POLICIES:
                scheduler = dataclasses.replace(config.scheduler, policy=policy)
                runs[policy].append(
                    _run_policy(dataclasses.replace(config, scheduler=scheduler), runner, requests)
                )
    finally:
        runner.shutdown()


def run_pipeline_bench(
    config: EngineConfig, requests: list[WorkloadRequest], one_process: bool, num_rounds: int = 1
) -> dict:
    """Each round runs both policies, one after the other, on the same pipeline; alternating them
    spreads the load of a shared machine over both instead of whichever ran during a busy spell."""
    import ray

    from workers.pipeline_runner import PipelineRunner, start_local_ray

    started_ray = not ray.is_initialized()  # a Ray this bench starts, it stops: callers may start their own
    start_local_ray(config.parallel)
    runs: dict[str, list[_Run]] = {policy: [] for policy in POLICIES}
    try:
        runner = PipelineRunner.create(config)
        report: dict = {"layer_ranges": runner.layer_ranges, "num_kv_blocks": runner.num_blocks}
        _run_rounds(config, runner, requests, runs, num_rounds)
    finally:
        if started_ray:
            ray.shutdown()
    for policy in POLICIES:
        report[policy] = result = _summary(runs[policy])
        print(
            f"{policy:>13}: {result['output_tokens_per_s']:.1f} output tokens/s, "
            f"bubble fraction {result['bubble_fraction']:.3f}, bubble {result['bubble_s']:.2f} stage-s, "
            f"utilisation {', '.join(f'{u:.2f}' for u in result['stage_utilisation'])}"
        )
    sarathi, baseline = report["sarathi"], report["prefill_first"]
    report["bubble_time_reduction"] = baseline["bubble_s"] / max(sarathi["bubble_s"], 1e-9)
    report["bubble_fraction_reduction"] = baseline["bubble_fraction"] / max(sarathi["bubble_fraction"], 1e-9)
    report["throughput_gain"] = sarathi["output_tokens_per_s"] / baseline["output_tokens_per_s"]
    print(
        f"SARATHI micro-batches: {report['bubble_time_reduction']:.2f}x less bubble time, "
        f"{report['bubble_fraction_reduction']:.2f}x lower bubble fraction, "
        f"{report['throughput_gain']:.2f}x the throughput of prefill-first micro-batches"
    )
    if one_process:
        report["one_process_sarathi"] = _run_one_process(config, requests)
        print(f"one process: {report['one_process_sarathi']['output_tokens_per_s']:.1f} output tokens/s")
    return report


def cmd_bench_pipeline(args: argparse.Namespace) -> int:
    import torch

    from pipeline.config_flags import engine_config_from_args
    from workers.checkpoint import load_tokenizer
    from workers.tiny_model import make_tiny_model

    torch.set_num_threads(args.torch_threads)
    if args.hidden_size is not None and not (Path(args.model) / "config.json").is_file():
        make_tiny_model(args.model, seed=args.seed, hidden_size=args.hidden_size, num_layers=args.num_layers)
    config = engine_config_from_args(args)
    kwargs = {"path": args.data} if args.data else {}
    tokenizer = load_tokenizer(config.model.model_dir)
    requests = sharegpt_requests(
        tokenizer, args.num_requests, args.seed, args.max_prompt_tokens, args.max_output_tokens, **kwargs
    )
    report = {
        "workload": {
            "num_requests": len(requests),
            "mean_prompt_tokens": statistics.fmean(len(r.prompt_token_ids) for r in requests),
            "mean_output_tokens": statistics.fmean(r.output_tokens for r in requests),
        },
        "config": {
            "model": config.model.model_dir,
            "pp_size": config.parallel.pp_size,
            "chunk_size": config.scheduler.chunk_size,
            "max_num_seqs": config.scheduler.max_num_seqs,
            "max_prefill_chunks": config.scheduler.max_prefill_chunks,
            "num_cpus": os.cpu_count(),
        },
        # Other work on the machine shows up as bubbles and slower stages: say how busy it was.
        "load_average_at_start": os.getloadavg()[0],
        "num_rounds": args.rounds,
        **run_pipeline_bench(config, requests, one_process=args.one_process, num_rounds=args.rounds),
    }
    report["load_average_at_end"] = os.getloadavg()[0]
    write_report(args.json, report)
    return 0


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    from pipeline.config_flags import add_engine_args, positive_int

    p = bench_subparsers.add_parser(
        "pipeline", help="pipeline bubbles: SARATHI vs prefill-first micro-batches (--policy is ignored)"
    )
    add_engine_args(p)
    p.set_defaults(pp_size=2, chunk_size=128, max_num_seqs=128, max_prefill_chunks=4)
    p.add_argument("--num-requests", type=positive_int, default=256)
    p.add_argument("--max-prompt-tokens", type=positive_int, default=512)
    p.add_argument("--max-output-tokens", type=positive_int, default=128)
    p.add_argument("--data", default=None, help="ShareGPT pairs (.jsonl.gz); the shared data by default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--hidden-size", type=positive_int, help="write a synthetic checkpoint this wide to --model"
    )
    p.add_argument("--num-layers", type=positive_int, default=8, help="layers of the synthetic checkpoint")
    p.add_argument("--rounds", type=positive_int, default=2, help="runs of each policy, alternating")
    p.add_argument("--one-process", action="store_true", help="also run SARATHI in one process for reference")
    p.add_argument("--json", help="write the report here")
    p.set_defaults(func=cmd_bench_pipeline)
