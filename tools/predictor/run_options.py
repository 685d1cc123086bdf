"""What each way of running the shipped predictor costs at batch 1, and how well it then ranks fresh prompts.

    python -m tools.predictor.run_options --labels cluster/predictor/data/smollm2-135m-instruct.seed0.jsonl \
        --tokenizer .models/smollm2-135m-instruct --json docs/results/smollm2-135m-instruct/predictor_latency.json

The options are the ones ``predictor`` in a deployment's YAML takes (``PredictorConfig``):
``encoder_precision`` (float32 as trained, or int8 Linear weights) and ``max_prompt_tokens`` (fewer word
pieces than the predictor was trained on). Each variant is the shipped default loaded that way
(``LengthPredictor.load``), so it is exactly what the ingress would run.

- Ranking: Spearman on the default's held-out labels, and on the **clean** ones (no group-mate among any
  prompt it trained on: the grouped evaluation of ``tools/predictor/generalisation.py``), with 95% intervals
  from a bootstrap over whole groups.
- Latency: ``predict([prompt])`` in this process, one torch thread, over the held-out prompts; the variants
  take turns on each prompt so that a change in the machine's load falls on all of them alike.
- With ``--model``: the ingress's own share of a request before it is routed, as ``GenerationService``
  spends it (the intake checks, renders the chat and tokenizes; the predictor answers), timed in this
  process without Ray: predicting after the intake (main's order) and overlapped with it, each precision,
  taking turns on each prompt.
"""

from __future__ import annotations

import argparse
import os
import time

from bench import predictor_results
from bench.labels import is_validation, read_records
from bench.request_stats import percentile
from tools.predictor.generalisation import Corpus, scored, subset, write_with_meta

VARIANTS = (("float32", None), ("int8", None), ("float32", 32), ("int8", 32))
"""(encoder_precision, max_prompt_tokens); None: the trained value. The first is the trained predictor."""


def variant_name(precision: str, max_prompt_tokens: int | None, trained_tokens: int) -> str:
    return f"{precision}, {max_prompt_tokens or trained_tokens} tokens"


def measure(labels: list, corpus: Corpus, latency_calls: int, directories: dict[str, str] | None = None) -> dict:
    """``directories``: name -> predictor directory, each run as trained and int8 (default: the shipped
    predictor in every ``VARIANTS`` way). They must share one held-out split."""
    import torch

    from cluster.predictor import LengthPredictor

    torch.set_num_threads(1)
    predictors = {}
    for name, directory in (directories or {"": None}).items():
        for precision, tokens in VARIANTS if not directories else VARIANTS[:2]:
            predictor = LengthPredictor.load(directory, encoder_precision=precision, max_prompt_tokens=tokens)
            trained_tokens = predictor.metadata.max_prompt_tokens
            label = variant_name(precision, tokens, trained_tokens)
            predictors[f"{name}: {label}" if name else label] = predictor
    fractions = {p.metadata.validation_fraction for p in predictors.values()}
    if len(fractions) > 1:
        raise ValueError(f"predictor: the predictors hold out different splits ({sorted(fractions)})")
    fraction = fractions.pop()
    held_out = [r for r in labels if is_validation(r.record_id, fraction)]
    truth = [r.output_tokens for r in held_out]
    groups = [corpus.group_of_id[r.record_id] for r in held_out]
    trained = corpus.trained_groups(fraction)
    clean = [i for i, g in enumerate(groups) if g not in trained]
    prompts = [r.prompt for r in held_out]

    timings: dict[str, list[float]] = {name: [] for name in predictors}
    for predictor in predictors.values():
        predictor.predict(prompts[:4])  # warm-up
    for prompt in prompts[:latency_calls]:
        for name, predictor in predictors.items():
            start = time.perf_counter()
            predictor.predict([prompt])
            timings[name].append((time.perf_counter() - start) * 1e3)

    result = {}
    for name, predictor in predictors.items():
        estimates = [float(x) for x in predictor.predict_log_tokens(prompts)[0]]
        result[name] = {
            "p50_ms_batch1": round(percentile(timings[name], 50), 2),
            "p99_ms_batch1": round(percentile(timings[name], 99), 2),
            "held_out": scored(estimates, truth, groups),
            "clean": scored(subset(clean, estimates), subset(clean, truth), subset(clean, groups)),
        }
    return {
        "validation_fraction": fraction,
        "num_latency_calls": min(latency_calls, len(prompts)),
        "variants": result,
    }


def time_ingress_share(prompts: list[str], model_dir: str) -> dict:
    """p50/p99 ms from a chat request's arrival to its predicted length, sequential and overlapped."""
    import asyncio

    from cluster.config import IngressConfig, PredictorConfig, SamplingDefaultsConfig
    from cluster.generation import early_predictor_text
    from cluster.intake import GenerationInput, Intake, SamplingDefaults
    from cluster.predictor_client import InProcessPredictor
    from pipeline.chat import ChatMessage
    from workers.checkpoint import load_tokenizer

    limits = IngressConfig()
    defaults = SamplingDefaults.resolve(model_dir, SamplingDefaultsConfig())
    intake = Intake(load_tokenizer(model_dir), limits, defaults, max_model_len=4096)
    clients = {
        p: InProcessPredictor(PredictorConfig(encoder_precision=p, cache_size=0)) for p in ("float32", "int8")
    }

    async def one(client: InProcessPredictor, request: GenerationInput, overlapped: bool) -> float:
        start = time.perf_counter()
        if overlapped:
            prediction = client.predict(early_predictor_text(request, limits.max_prompt_chars))
            intake.prepare(request)
            await prediction
        else:
            await client.predict(intake.prepare(request).predictor_text)
        return (time.perf_counter() - start) * 1e3

    async def run() -> dict[str, list[float]]:
        timings: dict[str, list[float]] = {}
        for prompt in prompts:
            request = GenerationInput(messages=(ChatMessage("user", prompt),), max_tokens=8)
            for precision, client in clients.items():
                for overlapped in (False, True):
                    key = f"{precision}, {'overlapped' if overlapped else 'after the intake'}"
                    timings.setdefault(key, []).append(await one(client, request, overlapped))
        return timings

    timings = asyncio.run(run())
    return {
        key: {"p50_ms": round(percentile(v, 50), 2), "p99_ms": round(percentile(v, 99), 2)}
        for key, v in timings.items()
    }


def render(result: dict) -> str:
    lines = [
        "| variant | p50 ms, batch 1 | p99 ms | held out: Spearman (95%), prompts | clean (grouped) |",
        "|---|---:|---:|---|---|",
    ]
    for name, v in result["variants"].items():
        cells = [
            f"{v[part]['spearman']:.3f} ({v[part]['spearman_ci95'][0]:.2f} to {v[part]['spearman_ci95'][1]:.2f}), "
            f"{v[part]['num_prompts']}"
            for part in ("held_out", "clean")
        ]
        lines.append(
            f"| {name} | {v['p50_ms_batch1']:.1f} | {v['p99_ms_batch1']:.1f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", required=True, help="a label file of cluster/predictor/data/")
    parser.add_argument("--tokenizer", required=True, help="the served model's directory (its tokenizer)")
    parser.add_argument(
        "--latency-calls", type=int, default=200, help="timed prompts per variant (default 200)"
    )
    parser.add_argument("--json", required=True, help="write the figures here")
    parser.add_argument(
        "--model", default=None, help="also time the ingress's share with this model's intake"
    )
    parser.add_argument(
        "--predictor",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="compare these predictors (each as trained and int8) instead of the shipped one's variants",
    )
    args = parser.parse_args(argv)
    directories = dict(item.split("=", 1) for item in args.predictor)
    if args.latency_calls < 1:
        raise ValueError(f"latency_calls: must be at least 1, got {args.latency_calls}")
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    labels = read_records(args.labels, args.tokenizer)
    result = measure(labels, Corpus.load(), args.latency_calls, directories or None)
    if args.model is not None:
        prompts = [r.prompt for r in labels if is_validation(r.record_id, result["validation_fraction"])]
        result["ingress_share"] = time_ingress_share(prompts[: args.latency_calls], args.model)
    result["targets"] = predictor_results.targets(result)
    write_with_meta(result, args.json, "run_options", argv, started, load_at_start)
    print(render(result))
    for key, figures in result.get("ingress_share", {}).items():
        print(f"intake + predict, {key}: p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
