"""Score a length predictor on held-out records against two baselines, and time it.

Figures (all on the held-out split, against the predictor's own buckets and training median):

- ``mae_tokens``: mean absolute error of the predicted length, in served-model tokens.
- ``spearman``: rank correlation of the continuous estimate with the true length (what SSJF needs).
- ``bucket_accuracy``: share of prompts put in their true bucket (training p25/p50/p75/p99 cuts).
- ``binary_accuracy``: share put on the right side of the training median (short vs long).

Baselines: ``median`` always predicts the training median; ``prompt_length_linear`` is a least-squares
line through ``log1p(output tokens)`` against ``log1p(prompt tokens)``, prompt tokens counted by the
served tokenizer.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

from cluster.predictor.lengths import bin_of, quantile
from cluster.predictor.model import tokens_from_log
from cluster.predictor.predictor import LengthPredictor
from tools.predictor.records import LengthRecord

NUM_LATENCY_CALLS = 30
NUM_WARMUP_CALLS = 3


@dataclass(frozen=True)
class Accuracy:
    mae_tokens: float
    spearman: float | None
    """None for a constant prediction, where rank correlation is undefined."""
    bucket_accuracy: float
    binary_accuracy: float


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation, ties given their average rank."""
    rx, ry = _ranks(np.asarray(x, dtype=float)), _ranks(np.asarray(y, dtype=float))
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    # Tied values share the mean of the ranks they span: 1-based ranks of distinct values, averaged.
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def score(
    log_estimates: list[float],
    bucket_ids: list[int],
    true_tokens: list[int],
    boundaries: list[int],
    median_tokens: float,
) -> Accuracy:
    """Accuracy of continuous ``log1p`` estimates and bucket ids against the true lengths."""
    predicted = [tokens_from_log(x) for x in log_estimates]
    num = len(true_tokens)
    return Accuracy(
        mae_tokens=sum(abs(p - t) for p, t in zip(predicted, true_tokens, strict=True)) / num,
        spearman=spearman(log_estimates, [float(t) for t in true_tokens]),
        bucket_accuracy=sum(b == bin_of(t, boundaries) for b, t in zip(bucket_ids, true_tokens, strict=True))
        / num,
        binary_accuracy=sum(
            (p > median_tokens) == (t > median_tokens) for p, t in zip(predicted, true_tokens, strict=True)
        )
        / num,
    )


def _line_fit(x: list[float], y: list[float]) -> tuple[float, float]:
    slope, intercept = np.polyfit(np.asarray(x), np.asarray(y), deg=1)
    return float(slope), float(intercept)


def baselines(
    train: list[LengthRecord],
    held_out: list[LengthRecord],
    prompt_tokens: dict[str, int],
    boundaries: list[int],
    median_tokens: float,
) -> dict[str, Accuracy]:
    """The two reference predictors, fit on ``train``; ``prompt_tokens`` maps a prompt to its length."""
    true_tokens = [r.output_tokens for r in held_out]
    train_median = quantile(sorted(r.output_tokens for r in train), 0.5)
    median_log = [float(np.log1p(train_median))] * len(held_out)
    median_buckets = [bin_of(train_median, boundaries)] * len(held_out)
    slope, intercept = _line_fit(
        [float(np.log1p(prompt_tokens[r.prompt])) for r in train],
        [float(np.log1p(r.output_tokens)) for r in train],
    )
    linear_log = [intercept + slope * float(np.log1p(prompt_tokens[r.prompt])) for r in held_out]
    linear_buckets = [bin_of(tokens_from_log(x), boundaries) for x in linear_log]
    return {
        "median": score(median_log, median_buckets, true_tokens, boundaries, median_tokens),
        "prompt_length_linear": score(linear_log, linear_buckets, true_tokens, boundaries, median_tokens),
    }


def p50_latency_ms(
    predictor: LengthPredictor, prompts: list[str], batch_size: int, num_timed_calls: int
) -> float:
    """Median wall time of one ``predict`` call on consecutive held-out prompts, in milliseconds."""
    num_calls = NUM_WARMUP_CALLS + num_timed_calls
    # Cycle through the prompts when the held-out split is small: every call gets a full batch.
    pool = (prompts * (num_calls * batch_size // len(prompts) + 1))[: num_calls * batch_size]
    times_ms = []
    for call in range(num_calls):
        batch = pool[call * batch_size : (call + 1) * batch_size]
        start = time.perf_counter()
        predictor.predict(batch)
        if call >= NUM_WARMUP_CALLS:
            times_ms.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times_ms)


def evaluate(
    predictor: LengthPredictor,
    train: list[LengthRecord],
    held_out: list[LengthRecord],
    prompt_tokens: dict[str, int],
    num_latency_calls: int = NUM_LATENCY_CALLS,
) -> dict[str, object]:
    """The report written by ``binserve eval-predictor``: the predictor's figures, baselines, latency."""
    if not held_out:
        raise ValueError(
            "data: no held-out records; use more records (the split holds out by a hash of the id)"
        )
    metadata = predictor.metadata
    log_estimates, head_buckets = predictor.predict_log_tokens([r.prompt for r in held_out])
    bucket_ids = (
        head_buckets
        if head_buckets is not None
        else [predictor.bucket_of(tokens_from_log(x)) for x in log_estimates]
    )
    true_tokens = [r.output_tokens for r in held_out]
    accuracy = score(
        log_estimates, bucket_ids, true_tokens, metadata.bucket_boundaries, metadata.median_output_tokens
    )
    prompts = [r.prompt for r in held_out]
    batch16_ms = p50_latency_ms(predictor, prompts, 16, num_latency_calls)
    return {
        **asdict(accuracy),
        "p50_latency_ms_batch1": p50_latency_ms(predictor, prompts, 1, num_latency_calls),
        "p50_latency_ms_batch16": batch16_ms,
        "p50_latency_ms_per_request_batch16": batch16_ms / 16,
        "baselines": {
            name: asdict(acc)
            for name, acc in baselines(
                train, held_out, prompt_tokens, metadata.bucket_boundaries, metadata.median_output_tokens
            ).items()
        },
        "num_held_out": len(held_out),
        "num_train_split": len(train),
        "head": metadata.head,
        "bucket_boundaries": metadata.bucket_boundaries,
        "median_output_tokens": metadata.median_output_tokens,
    }
