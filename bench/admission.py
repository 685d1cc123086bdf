"""Admission by predicted length under KV pressure: preemptions, throughput and mean JCT (issue 13, item 5).

    binserve bench admission --model .models/smollm2-135m-instruct --num-blocks 96 --json out/admission.json

The same ShareGPT requests (forced ChatGPT answer lengths, all arriving at once) run three times through
the real engine with a KV pool too small for them all: admission reserving the prompt only (today's
rule), reserving the predicted output too (``reserve_predicted_output``; the ChatGPT-length predictor's
guesses), and reserving the true output (oracle). A request whose blocks run out while decoding
preempts the latest-admitted one, which recomputes its prefix later: reserving ahead trades a little
concurrency for fewer recomputations.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

from bench import add_engine_workload_flags, reporting
from bench.experiments.harness import load_predictor, predicted_lengths, prediction_quality
from bench.replay import replay
from bench.request_stats import summarize
from bench.workload import sharegpt_requests
from pipeline.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig


def run(args: argparse.Namespace) -> dict:
    import torch

    from workers.llm import LLM, build_engine

    torch.set_num_threads(args.threads)
    base = SchedulerConfig(chunk_size=args.chunk_size, max_num_seqs=args.max_num_seqs)
    config = EngineConfig(
        ModelConfig(args.model, max_model_len=args.max_model_len),
        CacheConfig(num_blocks=args.num_blocks),
        base,
    )
    llm = LLM(config)
    requests = sharegpt_requests(
        llm.tokenizer, args.num_requests, args.seed, args.max_prompt_tokens, args.max_output_tokens
    )
    true_lengths = [r.output_tokens for r in requests]
    choice = load_predictor(args.predictor)
    if choice.predictor is None:
        raise ValueError(f"predictor: {choice.note}")
    predicted = list(predicted_lengths(requests, choice.predictor).output_tokens)
    rows = []
    for name, reserve, lengths in (
        ("prompt only (today)", False, predicted),
        ("predicted output", True, predicted),
        ("true output (oracle)", True, true_lengths),
    ):
        scheduler = dataclasses.replace(
            base, reserve_predicted_output=reserve, predicted_output_margin=args.margin
        )
        # A fresh scheduler over the same loaded model (every KV block is free between runs).
        engine = build_engine(dataclasses.replace(config, scheduler=scheduler), llm.runner)
        start_s = time.perf_counter()
        measured = replay(engine, requests, predicted=lengths, desc=name)
        summary = summarize(measured.metrics)
        rows.append(
            {
                "admission": name,
                "preemptions": engine.scheduler.num_preemptions,
                "output_tokens_per_s": summary.output_tokens_per_s,
                "mean_jct_s": summary.mean_jct_s,
                "p99_jct_s": summary.p99_jct_s,
                "wall_s": time.perf_counter() - start_s,
                "kv_blocks_in_use_after": config.cache.num_blocks
                - engine.scheduler.block_manager.num_free_blocks,
            }
        )
        print(rows[-1], flush=True)
    return {
        "params": {k: v for k, v in vars(args).items() if k != "func"},
        "predictor": choice.note,
        "prediction_quality": prediction_quality(true_lengths, predicted),
        "kv_capacity_tokens": llm.engine.scheduler.block_manager.capacity_tokens,
        "total_tokens_needed": sum(len(r.prompt_token_ids) + r.output_tokens for r in requests),
        "rows": rows,
        "load_average": os.getloadavg(),
    }


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser(
        "admission", help="admission by predicted length vs prompt only, under KV pressure (real engine)"
    )
    add_engine_workload_flags(p, num_requests=24, max_prompt_tokens=256, max_output_tokens=256)
    p.add_argument("--num-blocks", type=int, default=96, help="KV blocks of 16 tokens (default 96)")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--margin", type=float, default=0.25, help="predicted_output_margin (default 0.25)")
    p.add_argument("--predictor", default=None, help="default: the ChatGPT-length predictor")
    p.set_defaults(func=reporting(run))
