"""Which prompt-only predictor to serve: each family scored on prompts unlike any it trained on (issue 25,
item 0: the model choice; issue 21, item 4: a cheaper predictor that keeps the ranking).

    python -m tools.predictor.choice --labels cluster/predictor/data/smollm2-135m-instruct.seed0.jsonl \\
        --tokenizer .models/smollm2-135m-instruct --json docs/results/smollm2-135m-instruct/predictor_choice.json

Every one of SmolLM2's labelled prompts is predicted once, by a model fitted without its group: grouped
5-fold cross-validation over all the labels (``near_duplicates.grouped_folds``: near-duplicates and one
conversation's parts never span two folds), and the auxiliary ChatGPT-length records (the other ShareGPT
prompts, ChatGPT's answer length in SmolLM2 tokens) of a test fold's groups are left out of its training too.
So each estimate is one for a prompt with no near-duplicate or conversation-mate among anything its model saw.

Families, each a ridge regression on ``log1p`` output tokens over its features plus log prompt length and its
square (so they all see what prompt length alone sees):

- ``prompt length``: nothing else;
- ``n-grams``: hashed word 1-2-grams of the prompt (l2-normalised counts), no encoder at all;
- ``MiniLM``: the shipped encoder's pooled output (MiniLM-L6, first 4 layers, 48 head-and-tail tokens);
- ``MiniLM + n-grams``: both.

How the auxiliary records are used is a choice too: not at all, as extra rows at a weight, or **stacked**
(a ridge fitted on the auxiliary records alone predicts ChatGPT's length, and that prediction is one more
feature of a ridge fitted on the labels). Per family, the ridge's ``alpha`` and the auxiliary mode are
chosen *inside* each outer fold by grouped 4-fold cross-validation on its training labels alone (nested), so
no choice sees the prompts it is scored on. The shipped default's own held-out figures are printed beside,
for reference (its split is an id hash, not these folds). Intervals: 95% bootstrap over whole groups;
differences between families are paired (the same resampled groups).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import numpy as np

from bench import predictor_results
from bench.labels import count_tokens, read_records
from tools.predictor.evaluate import spearman
from tools.predictor.generalisation import Corpus, scored, write_with_meta
from tools.predictor.linear import MAX_OUTPUT_TOKENS, Design, Standardiser, fit_stacked
from tools.predictor.near_duplicates import grouped_folds

OUTER_FOLDS = 5
INNER_FOLDS = 4
DEPTHS = (0, 1, 2, 4)
"""MiniLM layers run before pooling: 0 is its word-piece embeddings alone; 4 is the shipped encoder."""
NGRAM_ALPHAS = (1.0, 3.0, 10.0, 30.0)
MINILM_ALPHAS = (10.0, 30.0, 100.0, 300.0)
AUX_MODES = ("none", 0.1, 0.3, "stacked")
CHATGPT_ALONE = predictor_results.CHATGPT_ALONE
"""Not a candidate: the stacked mode's auxiliary ridge by itself, fitted on ChatGPT's lengths only (the
issue's floor: never below the ChatGPT-length predictor)."""
BOOTSTRAP = 1000


class Features:
    """Per family, the design matrix of every prompt (labelled rows first, then auxiliary ones), built from
    ``linear.Design`` exactly as the served linear predictor computes its features."""

    def __init__(self, designs: dict[int, Design]) -> None:
        first = designs[DEPTHS[0]]
        everything = np.arange(first.pooled.shape[0])
        no_encoder = Design(np.zeros((len(everything), 0)), first.base, first.ngrams)
        standardiser = Standardiser.fit(no_encoder, everything)
        self.by_family = {
            "prompt length": standardiser.matrix(no_encoder, everything, ngrams=False),
            "n-grams": standardiser.matrix(no_encoder, everything),
        }
        self.alphas = {"prompt length": (1.0,), "n-grams": NGRAM_ALPHAS}
        for depth, design in designs.items():
            name = f"MiniLM, {depth} layers" + (" (the shipped encoder)" if depth == 4 else "")
            standardiser = Standardiser.fit(design, everything)
            self.by_family[name] = standardiser.matrix(design, everything, ngrams=False)
            self.by_family[f"{name} + n-grams"] = standardiser.matrix(design, everything)
            self.alphas[name] = self.alphas[f"{name} + n-grams"] = MINILM_ALPHAS


def fit_predict(x, y: np.ndarray, train, aux, test, alpha: float, aux_mode) -> np.ndarray:
    """Fit on the labelled rows ``train`` (and the auxiliary rows ``aux`` by ``aux_mode``), predict ``test``."""
    from sklearn.linear_model import Ridge

    if aux_mode == "aux only":
        return Ridge(alpha=alpha).fit(x[aux], y[aux]).predict(x[test])
    if aux_mode == "stacked":
        fit = fit_stacked(x, y, train, aux, alpha)
        return x[test] @ fit.coef + fit.intercept
    if aux_mode == "none":
        rows, weights = train, None
    else:
        rows = np.concatenate([train, aux])
        weights = np.concatenate([np.ones(len(train)), np.full(len(aux), float(aux_mode))])
    return Ridge(alpha=alpha).fit(x[rows], y[rows], sample_weight=weights).predict(x[test])


def run(args: argparse.Namespace) -> dict:
    from bench.workload import read_sharegpt

    labels = read_records(args.labels, args.tokenizer)
    corpus = Corpus.load()
    labelled = {r.record_id for r in labels}
    aux_pairs = [p for p in read_sharegpt() if p["id"] not in labelled]
    prompts = [r.prompt for r in labels] + [p["prompt"] for p in aux_pairs]
    n = len(labels)
    truth = np.asarray([r.output_tokens for r in labels], dtype=float)
    aux_lengths = np.minimum(count_tokens([p["response"] for p in aux_pairs], args.tokenizer), MAX_OUTPUT_TOKENS)
    y = np.log1p(np.concatenate([truth, np.asarray(aux_lengths, dtype=float)]))
    groups = np.asarray(
        [corpus.group_of_id[r.record_id] for r in labels] + [corpus.group_of_id[p["id"]] for p in aux_pairs]
    )
    print(f"{n} labels, {len(aux_pairs)} auxiliary records; encoding with MiniLM ...", flush=True)
    started = time.perf_counter()
    features = Features(Design.of(prompts, max(DEPTHS), DEPTHS))
    print(f"encoded in {time.perf_counter() - started:.0f} s", flush=True)

    label_groups = groups[:n]
    outer = np.asarray(grouped_folds(label_groups.tolist(), OUTER_FOLDS))
    aux_index = np.arange(n, len(prompts))
    estimates: dict[str, np.ndarray] = {}
    chosen: dict[str, list] = {}
    families = dict(features.by_family)
    families[CHATGPT_ALONE] = features.by_family[predictor_results.CHOSEN]
    alphas = dict(features.alphas, **{CHATGPT_ALONE: MINILM_ALPHAS})
    for family, x in families.items():
        estimate = np.empty(n)
        chosen[family] = []
        for fold in range(OUTER_FOLDS):
            test = np.flatnonzero(outer == fold)
            train = np.flatnonzero(outer != fold)
            aux = aux_index[~np.isin(groups[aux_index], label_groups[test])]
            inner = np.asarray(grouped_folds(label_groups[train].tolist(), INNER_FOLDS))
            search = {}
            modes = ("aux only",) if family == CHATGPT_ALONE else AUX_MODES
            for alpha, aux_mode in itertools.product(alphas[family], modes):
                inner_estimate = np.empty(len(train))
                for k in range(INNER_FOLDS):
                    inner_test = train[inner == k]
                    inner_aux = aux[~np.isin(groups[aux], label_groups[inner_test])]
                    inner_estimate[inner == k] = fit_predict(
                        x, y, train[inner != k], inner_aux, inner_test, alpha, aux_mode
                    )
                search[alpha, aux_mode] = spearman(inner_estimate.tolist(), truth[train].tolist())
            alpha, aux_mode = max(search, key=search.get)
            chosen[family].append({"alpha": alpha, "aux": aux_mode, "inner_spearman": round(search[alpha, aux_mode], 4)})
            estimate[test] = fit_predict(x, y, train, aux, test, alpha, aux_mode)
        estimates[family] = estimate
        print(f"{family}: out-of-fold Spearman {spearman(estimate.tolist(), truth.tolist()):.3f}; chose {chosen[family]}", flush=True)

    scores = {name: scored(e.tolist(), truth.astype(int).tolist(), label_groups.tolist()) for name, e in estimates.items()}
    reference = "MiniLM, 4 layers (the shipped encoder)"
    differences = paired_differences(estimates, truth, label_groups, reference=reference)
    return {
        "num_labels": n,
        "num_label_groups": int(len(set(label_groups.tolist()))),
        "num_aux_records": len(aux_pairs),
        "outer_folds": OUTER_FOLDS,
        "inner_folds": INNER_FOLDS,
        "grid": {"alphas": {k: list(v) for k, v in alphas.items()}, "aux_modes": [str(m) for m in AUX_MODES]},
        "reference": reference,
        "chosen_per_fold": chosen,
        "scores": scores,
        "differences_from_reference": differences,
    }


def paired_differences(estimates: dict, truth: np.ndarray, groups: np.ndarray, reference: str) -> dict:
    """Spearman of each family minus the reference's, with a 95% interval over resampled whole groups."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    unique = np.unique(groups)
    members = {g: np.flatnonzero(groups == g) for g in unique}
    draws = {name: [] for name in estimates if name != reference}
    for _ in range(BOOTSTRAP):
        rows = np.concatenate([members[g] for g in rng.choice(unique, len(unique))])
        base = spearmanr(estimates[reference][rows], truth[rows]).statistic
        for name in draws:
            draws[name].append(spearmanr(estimates[name][rows], truth[rows]).statistic - base)
    point = {name: spearman(e.tolist(), truth.tolist()) for name, e in estimates.items()}
    return {
        name: {
            "difference": round(point[name] - point[reference], 4),
            "ci95": [round(float(np.percentile(d, 2.5)), 4), round(float(np.percentile(d, 97.5)), 4)],
        }
        for name, d in draws.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", required=True)
    parser.add_argument("--tokenizer", required=True, help="the served model's directory (its tokenizer)")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    started, load = time.perf_counter(), os.getloadavg()[0]
    result = run(args)
    for name, s in result["scores"].items():
        d = result["differences_from_reference"].get(name)
        extra = f"; minus the shipped encoder's {d['difference']:+.3f} {d['ci95']}" if d else ""
        print(f"{name}: {s['spearman']:.3f} {s['spearman_ci95']}{extra}")
    result["targets"] = predictor_results.targets(result)
    write_with_meta(result, args.json, "choice", argv, started, load)
    print(json.dumps(result["meta"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
