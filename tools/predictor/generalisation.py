"""How well a length predictor ranks prompts unlike any it was trained on.

    python -m tools.predictor.generalisation --labels cluster/predictor/data/smollm2-135m-instruct.seed0.jsonl \
        --tokenizer .models/smollm2-135m-instruct --json out/generalisation.json

An id-hash split (``records.is_validation``) puts a prompt in the held-out split while its near-duplicate or
another part of its conversation may be in training. Here every prompt of the 10,000 ShareGPT pairs gets a
group (``near_duplicates.prompt_groups``: word 5-gram Jaccard >= 0.8, or one conversation), and:

- each shipped predictor is scored on its own held-out labels, split into **clean** (no group-mate among
  the prompts it was trained on: any label or auxiliary ShareGPT record outside its held-out split) and
  **leaked**; the clean figure is the estimate of how it does on fresh prompts;
- every predictor, and prompt length alone, is scored on the prompts clean for all of them;
- prompt length alone (a line through log lengths) is also fitted and scored by grouped k-fold and, for
  contrast, by plain k-fold over the same labels.

Intervals are 95% bootstrap intervals that resample whole groups (``group_bootstrap_ci``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.labels import LengthRecord, count_tokens, is_validation, read_records
from tools.predictor.evaluate import spearman
from tools.predictor.near_duplicates import group_bootstrap_ci, grouped_folds, prompt_groups

NUM_FOLDS = 5
REPO_DIR = Path(__file__).resolve().parents[2]
PREDICTORS = {
    "shipped default (SmolLM2 labels + ChatGPT aux)": REPO_DIR / "cluster" / "predictor" / "default",
    "ChatGPT-length predictor": REPO_DIR / "cluster" / "predictor" / "chatgpt",
}


@dataclass(frozen=True)
class Corpus:
    """The ShareGPT prompts that labels and auxiliary records are drawn from, with their groups."""

    group_of_id: dict[str, int]
    ids: list[str]

    @classmethod
    def load(cls) -> Corpus:
        from bench.workload import read_sharegpt

        pairs = read_sharegpt()
        ids = [p["id"] for p in pairs]
        groups = prompt_groups(ids, [p["prompt"] for p in pairs])
        return cls(dict(zip(ids, groups, strict=True)), ids)

    def trained_groups(self, validation_fraction: float) -> set[int]:
        """Groups holding a prompt that a predictor with this split trained on (every id outside it)."""
        return {self.group_of_id[i] for i in self.ids if not is_validation(i, validation_fraction)}


def scored(estimates: list[float], truth: list[int], groups: list[int]) -> dict:
    return {
        "num_prompts": len(truth),
        "num_groups": len(set(groups)),
        "spearman": spearman(estimates, [float(t) for t in truth]) if len(truth) > 1 else None,
        "spearman_ci95": group_bootstrap_ci(estimates, truth, groups) if len(truth) > 1 else [],
    }


def subset(rows: list[int], values: list) -> list:
    return [values[i] for i in rows]


def fold_estimates(log_prompt: np.ndarray, log_output: np.ndarray, folds: list[int]) -> list[float]:
    """Out-of-fold estimates of a least-squares line through (log prompt, log output) fitted per fold."""
    estimates = np.empty_like(log_output)
    fold_ids = np.asarray(folds)
    for fold in set(folds):
        test = fold_ids == fold
        slope, intercept = np.polyfit(log_prompt[~test], log_output[~test], 1)
        estimates[test] = intercept + slope * log_prompt[test]
    return estimates.tolist()


def run(labels: list[LengthRecord], tokenizer_dir: str, corpus: Corpus) -> dict:
    from cluster.predictor.predictor import LengthPredictor

    prompts = [r.prompt for r in labels]
    truth = [r.output_tokens for r in labels]
    groups = [corpus.group_of_id[r.record_id] for r in labels]
    prompt_tokens = [float(n) for n in count_tokens(prompts, tokenizer_dir)]
    estimates = {"prompt length alone": prompt_tokens}
    fractions = {}
    for name, directory in PREDICTORS.items():
        predictor = LengthPredictor.load(directory)
        estimates[name] = [float(x) for x in predictor.predict_log_tokens(prompts)[0]]
        fractions[name] = predictor.metadata.validation_fraction

    by_predictor = {}
    clean_for_all = set(range(len(labels)))
    for name, fraction in fractions.items():
        trained = corpus.trained_groups(fraction)
        held_out = [i for i, r in enumerate(labels) if is_validation(r.record_id, fraction)]
        clean = [i for i in held_out if groups[i] not in trained]
        leaked = [i for i in held_out if groups[i] in trained]
        clean_for_all &= set(clean)
        by_predictor[name] = {
            "validation_fraction": fraction,
            **{
                f"{part} ({source})": scored(
                    subset(rows, estimates[source]), subset(rows, truth), subset(rows, groups)
                )
                for part, rows in (("held out", held_out), ("clean", clean), ("leaked", leaked))
                for source in (name, "prompt length alone")
            },
        }
    common = sorted(clean_for_all)
    on_common = {
        name: scored(subset(common, values), subset(common, truth), subset(common, groups))
        for name, values in estimates.items()
    }

    log_prompt = np.log1p(np.asarray(prompt_tokens))
    log_output = np.log1p(np.asarray(truth, dtype=float))
    plain_folds = [
        int(i * NUM_FOLDS / len(labels)) for i in np.random.default_rng(0).permutation(len(labels))
    ]
    k_fold = {
        kind: scored(fold_estimates(log_prompt, log_output, folds), truth, groups)
        for kind, folds in (
            ("grouped", grouped_folds(groups, NUM_FOLDS)),
            ("plain (records shuffled)", plain_folds),
        )
    }
    return {
        "num_labels": len(labels),
        "num_label_groups": len(set(groups)),
        "num_labels_sharing_a_group": sum(groups.count(g) > 1 for g in groups),
        "num_corpus_prompts": len(corpus.ids),
        "num_corpus_groups": len(set(corpus.group_of_id.values())),
        "by_predictor": by_predictor,
        "clean_for_every_predictor": on_common,
        f"prompt_length_line_{NUM_FOLDS}_fold": k_fold,
    }


def render(result: dict) -> str:
    def cell(figures: dict) -> str:
        rho, ci = figures["spearman"], figures["spearman_ci95"]
        if rho is None:
            return "n/a"
        return f"{rho:.2f} ({ci[0]:.2f} to {ci[1]:.2f}), {figures['num_prompts']}" if ci else f"{rho:.2f}"

    lines = ["| predictor | held out: Spearman (95%), prompts | clean | leaked |", "|---|---|---|---|"]
    for name, parts in result["by_predictor"].items():
        for source in (name, "prompt length alone"):
            label = source if source == name else f"prompt length alone, {name}'s split"
            cells = [cell(parts[f"{part} ({source})"]) for part in ("held out", "clean", "leaked")]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| on the prompts clean for every predictor | Spearman (95%), prompts |", "|---|---|"]
    lines += [f"| {name} | {cell(f)} |" for name, f in result["clean_for_every_predictor"].items()]
    lines += ["", "| prompt length alone, a line fitted per fold | Spearman (95%), prompts |", "|---|---|"]
    lines += [f"| {kind} | {cell(f)} |" for kind, f in result[f"prompt_length_line_{NUM_FOLDS}_fold"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", required=True, help="a label file of cluster/predictor/data/")
    parser.add_argument("--tokenizer", required=True, help="the served model's directory (its tokenizer)")
    parser.add_argument("--json", required=True, help="write the figures here")
    args = parser.parse_args(argv)
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    labels = read_records(args.labels, args.tokenizer)
    result = run(labels, args.tokenizer, Corpus.load())
    write_with_meta(result, args.json, "generalisation", argv, started, load_at_start)
    print(render(result))
    return 0


def write_with_meta(
    result: dict, path: str, module: str, argv: list[str] | None, started: float, load_at_start: float
) -> None:
    """Write ``result`` as JSON with how it was made (``harness.run_meta``: the machine, the date, the
    command, the duration, the load), as every result of the report carries it."""
    from bench.experiments.harness import run_meta, write_json

    command = f"python -m tools.predictor.{module} " + " ".join(sys.argv[1:] if argv is None else argv)
    result["meta"] = run_meta(command, round(time.perf_counter() - started, 1), round(load_at_start, 2))
    write_json(path, result)


if __name__ == "__main__":
    raise SystemExit(main())
