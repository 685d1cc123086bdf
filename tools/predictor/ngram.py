"""Could a bag of word n-grams replace MiniLM in the ingress? Its ranking on the default's held-out and clean
prompts, and its cost a prompt (issue 21, item 4: the predictor off the critical path).

    python -m tools.predictor.ngram --labels cluster/predictor/data/smollm2-135m-instruct.seed0.jsonl \\
        --tokenizer .models/smollm2-135m-instruct --json docs/results/smollm2-135m-instruct/predictor_ngram.json

A ridge regression on log output tokens over hashed word 1-2-grams of the prompt (scikit-learn's
``HashingVectorizer``, l2-normalised counts) and its log prompt tokens, trained on the shipped default's
own training split: its SmolLM2 labels, plus (at ``aux_weight``) ChatGPT's answer lengths in SmolLM2 tokens
for the other prompts outside its held-out split, as the default's auxiliary target is. ``alpha`` and
``aux_weight`` are chosen by grouped 5-fold cross-validation on the training labels alone
(``near_duplicates.grouped_folds``); the held-out labels are scored once, at the end, beside the shipped
predictor (float32 and int8, as the ingress loads it) on the same prompts. Latency: one prompt at a time,
vectorised and scored in this process.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from bench.labels import count_tokens, is_validation, read_records
from bench.request_stats import percentile
from tools.predictor.evaluate import spearman
from tools.predictor.generalisation import Corpus, scored, subset, write_with_meta
from tools.predictor.near_duplicates import grouped_folds

ALPHAS = (0.3, 1.0, 3.0, 10.0)
AUX_WEIGHTS = (0.0, 0.1, 0.3, 1.0)
MAX_OUTPUT_TOKENS = 512
"""The labels' cap (SmolLM2's answers are collected at 512 tokens); ChatGPT's lengths are capped alike."""


class NgramModel:
    def __init__(self, alpha: float) -> None:
        from sklearn.feature_extraction.text import HashingVectorizer
        from sklearn.linear_model import Ridge

        self.vectorizer = HashingVectorizer(ngram_range=(1, 2), n_features=2**18, alternate_sign=False)
        self.ridge = Ridge(alpha=alpha)

    def features(self, prompts: list[str], log_prompt_tokens: np.ndarray):
        from scipy.sparse import csr_matrix, hstack

        return hstack(
            [self.vectorizer.transform(prompts), csr_matrix(log_prompt_tokens[:, None] / 8.0)]
        ).tocsr()

    def fit(
        self, prompts: list[str], log_prompt_tokens: np.ndarray, log_output: np.ndarray, weights
    ) -> NgramModel:
        self.ridge.fit(self.features(prompts, log_prompt_tokens), log_output, sample_weight=weights)
        return self

    def predict(self, prompts: list[str], log_prompt_tokens: np.ndarray) -> np.ndarray:
        return self.ridge.predict(self.features(prompts, log_prompt_tokens))


def search_label(alpha: float, aux_weight: float) -> str:
    return f"alpha {alpha}, aux weight {aux_weight}"


def run(args: argparse.Namespace) -> dict:
    from bench.workload import read_sharegpt

    fraction = json.loads((Path("cluster/predictor/default") / "predictor.json").read_text())[
        "validation_fraction"
    ]
    labels = read_records(args.labels)
    corpus = Corpus.load()
    train = [r for r in labels if not is_validation(r.record_id, fraction)]
    held_out = [r for r in labels if is_validation(r.record_id, fraction)]
    labelled = {r.record_id for r in labels}
    aux = [p for p in read_sharegpt() if p["id"] not in labelled and not is_validation(p["id"], fraction)]
    aux_lengths = [
        min(n, MAX_OUTPUT_TOKENS) for n in count_tokens([p["response"] for p in aux], args.tokenizer)
    ]

    def log_tokens(prompts: list[str]) -> np.ndarray:
        return np.log1p(np.asarray(count_tokens(prompts, args.tokenizer), dtype=float))

    train_prompts = [r.prompt for r in train]
    train_log_prompt = log_tokens(train_prompts)
    train_log_output = np.log1p([r.output_tokens for r in train])
    aux_prompts = [p["prompt"] for p in aux]
    aux_log_prompt, aux_log_output = log_tokens(aux_prompts), np.log1p(aux_lengths)

    def fit(rows: np.ndarray, alpha: float, aux_weight: float) -> NgramModel:
        prompts = subset(list(rows), train_prompts)
        log_prompt, log_output = train_log_prompt[rows], train_log_output[rows]
        weights = np.ones(len(rows))
        if aux_weight > 0:
            prompts = prompts + aux_prompts
            log_prompt = np.concatenate([log_prompt, aux_log_prompt])
            log_output = np.concatenate([log_output, aux_log_output])
            weights = np.concatenate([weights, np.full(len(aux_prompts), aux_weight)])
        return NgramModel(alpha).fit(prompts, log_prompt, log_output, weights)

    folds = np.asarray(grouped_folds([corpus.group_of_id[r.record_id] for r in train], 5))
    search: dict[tuple[float, float], float] = {}
    for alpha, aux_weight in itertools.product(ALPHAS, AUX_WEIGHTS):
        estimates = np.empty(len(train))
        for fold in sorted(set(folds.tolist())):
            test = np.flatnonzero(folds == fold)
            model = fit(np.flatnonzero(folds != fold), alpha, aux_weight)
            estimates[test] = model.predict(subset(list(test), train_prompts), train_log_prompt[test])
        search[alpha, aux_weight] = spearman(estimates.tolist(), train_log_output.tolist())
        print(
            f"{search_label(alpha, aux_weight)}: grouped 5-fold Spearman {search[alpha, aux_weight]:.3f}",
            flush=True,
        )
    alpha, aux_weight = max(search, key=search.get)
    model = fit(np.arange(len(train)), alpha, aux_weight)

    prompts = [r.prompt for r in held_out]
    truth = [r.output_tokens for r in held_out]
    groups = [corpus.group_of_id[r.record_id] for r in held_out]
    trained = corpus.trained_groups(fraction)
    clean = [i for i, g in enumerate(groups) if g not in trained]
    estimates = {"n-grams (ridge)": model.predict(prompts, log_tokens(prompts)).tolist()}
    from cluster.predictor import LengthPredictor

    for precision in ("float32", "int8"):
        predictor = LengthPredictor.load(encoder_precision=precision)
        estimates[f"shipped default, {precision}"] = [
            float(x) for x in predictor.predict_log_tokens(prompts)[0]
        ]

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    timings = []
    for prompt in prompts[: args.latency_calls]:
        start = time.perf_counter()
        n = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        model.predict([prompt], np.asarray([math.log1p(n)]))
        timings.append((time.perf_counter() - start) * 1e3)
    return {
        "validation_fraction": fraction,
        "num_training_labels": len(train),
        "num_aux_records": len(aux),
        "grouped_cv_spearman": {search_label(*key): value for key, value in search.items()},
        "chosen": {"alpha": alpha, "aux_weight": aux_weight},
        "ngram_latency_ms": {
            "p50": percentile(timings, 50),
            "p99": percentile(timings, 99),
            "calls": len(timings),
        },
        "scores": {
            name: {
                "held_out": scored(e, truth, groups),
                "clean": scored(subset(clean, e), subset(clean, truth), subset(clean, groups)),
            }
            for name, e in estimates.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labels", required=True)
    p.add_argument("--tokenizer", required=True, help="the served model's directory (its tokenizer)")
    p.add_argument("--latency-calls", type=int, default=200)
    p.add_argument("--json")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    load = os.getloadavg()[0]
    result = run(args)
    for name, s in result["scores"].items():
        print(
            f"{name}: held out {s['held_out']['spearman']:.3f} {s['held_out']['spearman_ci95']}, "
            f"clean {s['clean']['spearman']:.3f} {s['clean']['spearman_ci95']}"
        )
    print(f"n-gram latency p50 {result['ngram_latency_ms']['p50']:.3f} ms (tokenizing included)")
    if args.json:
        write_with_meta(result, args.json, "ngram", argv, started, load)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
