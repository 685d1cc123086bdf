"""Train and score the length probe: the served model's hidden state -> its remaining output tokens.

    binserve predictor collect --model $M --out L.jsonl --features F ...      # labels + hidden states
    binserve predictor train-probe --labels L.jsonl --features F --model $M --out cluster/predictor/default/probe

The data: for each collected prompt, its output length (the label line) and its final-normed hidden
state at output positions 0, 16, 32, 64, 128 and 256 (``workers.length_probe.FeatureRecorder``). Each
(prompt, position) the answer reached is one example: the target is ``log1p(total - position)``, the
tokens still to come. A ridge regression (closed form; its strength chosen on a slice of the training
prompts) fits them all at once, with ``log1p(position)`` as one more input. Prompts are split into
training and held out by the predictor's fixed hash of the id (``records.is_validation``), and the
held-out figures are reported per position: Spearman, Kendall and MAE of the remaining tokens.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.labels import is_validation

RIDGE_STRENGTHS = (10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0)
REPORT_POSITIONS = (0, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class ProbeRecord:
    record_id: str
    output_tokens: int
    states: dict[int, np.ndarray]
    """Output position -> hidden state (float32)."""


def read_probe_data(labels: Path, features: Path) -> list[ProbeRecord]:
    """Labels joined with their saved hidden states; prompts without saved states are left out."""
    from safetensors.numpy import load_file

    if not labels.is_file():
        raise ValueError(f"labels: no such file {labels}")
    if not features.is_dir():
        raise ValueError(f"features: no such directory {features} (collect with --features)")
    records, sizes = [], set()
    # JSONL lines end at "\n" only: str.splitlines would also split a prompt holding U+2028.
    for line_no, line in enumerate(labels.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            label = json.loads(line)
            record_id, output_tokens = str(label["id"]), int(label["output_tokens"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"{labels}:{line_no}: not a label line with id and output_tokens ({exc})"
            ) from None
        path = features / f"{record_id}.safetensors"
        if not path.is_file():
            continue
        states = {int(k.removeprefix("at_")): v.astype(np.float32) for k, v in load_file(str(path)).items()}
        sizes.update(v.shape[-1] for v in states.values())
        records.append(ProbeRecord(record_id, output_tokens, states))
    if not records:
        raise ValueError(f"features: none of the {labels} prompts has hidden states in {features}")
    if len(sizes) > 1:
        raise ValueError(f"features: hidden states of different sizes {sorted(sizes)} (two models mixed)")
    return records


def examples(records: list[ProbeRecord], positions: tuple[int, ...] | None = None):
    """(hidden (n, H), positions (n,), remaining tokens (n,), record index (n,)) over every recorded state
    before the answer's end (at ``positions`` only, if given)."""
    hidden, at, remaining, owner = [], [], [], []
    for i, record in enumerate(records):
        for position, state in sorted(record.states.items()):
            if record.output_tokens <= position or (positions is not None and position not in positions):
                continue
            hidden.append(state)
            at.append(position)
            remaining.append(record.output_tokens - position)
            owner.append(i)
    if not hidden:
        return np.zeros((0, 0)), np.zeros(0), np.zeros(0), np.zeros(0, dtype=int)
    return np.stack(hidden), np.asarray(at, float), np.asarray(remaining, float), np.asarray(owner)


def fit_ridge(hidden: np.ndarray, at: np.ndarray, remaining: np.ndarray, strength: float):
    """(weight over [standardised hidden, log1p(at)], bias, mean, scale) minimising squared error in
    log1p(remaining) plus ``strength`` times the squared weights."""
    mean, scale = hidden.mean(0), hidden.std(0) + 1e-6
    x = np.concatenate([(hidden - mean) / scale, np.log1p(at)[:, None]], axis=1)
    y = np.log1p(remaining)
    x_mean, y_mean = x.mean(0), y.mean()
    xc, yc = x - x_mean, y - y_mean
    weight = np.linalg.solve(xc.T @ xc + strength * np.eye(x.shape[1]), xc.T @ yc)
    bias = float(y_mean - x_mean @ weight)
    return weight, bias, mean, scale


def predict_ridge(model, hidden: np.ndarray, at: np.ndarray) -> np.ndarray:
    weight, bias, mean, scale = model
    x = np.concatenate([(hidden - mean) / scale, np.log1p(at)[:, None]], axis=1)
    return np.expm1(x @ weight + bias).clip(min=0.0)


def train_probe(records: list[ProbeRecord], tuning_fraction: float = 0.2):
    """Choose the ridge strength on a hash slice of the training prompts, then refit on all of them."""
    tune = [r for r in records if is_validation("probe-tune:" + r.record_id, tuning_fraction)]
    fit = [r for r in records if not is_validation("probe-tune:" + r.record_id, tuning_fraction)]
    best, chosen = None, RIDGE_STRENGTHS[-1]
    if tune and fit:
        h, a, y, _ = examples(fit)
        th, ta, ty, _ = examples(tune)
        for strength in RIDGE_STRENGTHS:
            error = np.mean(
                np.abs(np.log1p(predict_ridge(fit_ridge(h, a, y, strength), th, ta)) - np.log1p(ty))
            )
            if best is None or error < best:
                best, chosen = error, strength
    h, a, y, _ = examples(records)
    return fit_ridge(h, a, y, chosen), chosen


def held_out_report(
    model, records: list[ProbeRecord], prompt_only: dict[str, int] | None = None
) -> dict[str, dict]:
    """Per output position: how well the probe ranks and sizes the held-out prompts' remaining tokens;
    with ``prompt_only`` (id -> a prompt-only predictor's whole-output guess), that guess minus the
    position scored the same way, for comparison."""
    from tools.predictor.evaluate import kendall_tau, spearman, spearman_ci95

    report = {}
    for position in REPORT_POSITIONS:
        hidden, at, remaining, owner = examples(records, (position,))
        if len(remaining) < 3:
            continue
        predicted = predict_ridge(model, hidden, at)
        baseline = {}
        if prompt_only is not None:
            guess = np.asarray([max(prompt_only[records[i].record_id] - position, 1) for i in owner], float)
            baseline = {
                "prompt_only_spearman": spearman(guess.tolist(), remaining.tolist()),
                "prompt_only_mae_tokens": float(np.mean(np.abs(guess - remaining))),
            }
        report[str(position)] = {
            "num_held_out": int(len(remaining)),
            "spearman": spearman(predicted.tolist(), remaining.tolist()),
            "spearman_ci95": spearman_ci95(predicted.tolist(), remaining.astype(int).tolist()),
            "kendall_tau": kendall_tau(predicted.tolist(), remaining.tolist()),
            "mae_tokens": float(np.mean(np.abs(predicted - remaining))),
            "median_remaining": float(np.median(remaining)),
            **baseline,
        }
    return report


def prompt_only_guesses(predictor_dir: str, record_ids: list[str], model_dir: Path) -> dict[str, int]:
    """A prompt-only predictor's whole-output guesses for ShareGPT ids, from the user turn as the ingress
    gives it (``pipeline.chat.predictor_text``)."""
    from bench.workload import read_sharegpt
    from cluster.predictor import LengthPredictor

    predictor = LengthPredictor.load(None if predictor_dir == "default" else predictor_dir)
    predictor.check_served_model(str(model_dir))
    prompts = {p["id"]: p["prompt"] for p in read_sharegpt()}
    missing = [i for i in record_ids if i not in prompts]
    if missing:
        raise ValueError(
            f"--compare-predictor: {len(missing)} ids are not ShareGPT pairs, e.g. {missing[0]!r}"
        )
    guesses = predictor.predict([prompts[i] for i in record_ids]).output_tokens
    return {i: int(n) for i, n in zip(record_ids, guesses, strict=True)}


def run_train_probe(args: argparse.Namespace) -> int:
    import torch

    from bench import write_report
    from cluster.predictor.served_model import ServedModel
    from workers.length_probe import LengthProbe, ProbeMetadata

    records = read_probe_data(args.labels, args.features)
    train = [r for r in records if not is_validation(r.record_id, args.validation_fraction)]
    held_out = [r for r in records if is_validation(r.record_id, args.validation_fraction)]
    if not train:
        raise ValueError(f"labels: no training prompts among {len(records)} (lower --validation-fraction)")
    model, strength = train_probe(train)
    hidden_size = model[2].shape[0]
    served = ServedModel.of(args.model)
    config = json.loads((Path(args.model) / "config.json").read_text())
    if config.get("hidden_size") != hidden_size:
        raise ValueError(
            f"model: {args.model} has hidden size {config.get('hidden_size')}, the features {hidden_size}"
        )
    weight, bias, mean, scale = model
    metadata = ProbeMetadata(
        hidden_size=hidden_size,
        model=served.name,
        model_config_sha256=served.config_sha256,
        start=0,  # the prompt's own last state already ranks (held-out figures in RESULTS.md)
        trained_on=f"{len(train)} prompts of {args.labels.name} (ridge strength {strength})",
    )
    probe = LengthProbe(
        torch.from_numpy(weight), bias, torch.from_numpy(mean), torch.from_numpy(scale), metadata
    )
    probe.save(args.out)
    prompt_only = None
    if args.compare_predictor is not None and held_out:
        prompt_only = prompt_only_guesses(args.compare_predictor, [r.record_id for r in held_out], args.model)
    summary = {
        "num_train": len(train),
        "num_held_out": len(held_out),
        "ridge_strength": strength,
        "held_out": held_out_report(model, held_out, prompt_only) if held_out else {},
        "out": str(args.out),
    }
    print(json.dumps(summary, indent=1))
    write_report(args.json, summary)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    probe = commands.add_parser(
        "train-probe",
        help="fit the length probe (hidden state -> remaining output tokens) on collected features",
    )
    probe.add_argument("--labels", required=True, type=Path, help="collect's label file (JSONL)")
    probe.add_argument("--features", required=True, type=Path, help="collect's --features directory")
    probe.add_argument("--model", required=True, type=Path, help="the served model's directory")
    probe.add_argument("--out", required=True, type=Path, help="directory to write the probe to")
    probe.add_argument(
        "--validation-fraction", type=float, default=0.3, help="prompts held out by id hash (default 0.3)"
    )
    probe.add_argument(
        "--compare-predictor",
        default=None,
        help="also score a prompt-only predictor (a directory, or 'default') on the held-out prompts",
    )
    probe.add_argument("--json", type=Path, default=None, help="write the figures here as JSON")
    probe.set_defaults(func=run_train_probe)
