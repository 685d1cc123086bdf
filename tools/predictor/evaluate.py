"""Score a length predictor on held-out records against baselines, time it, and measure the noise floor.

Figures, each over the scored records and against *their own* length distribution:

- ``spearman``, ``kendall_tau`` (tau-b): rank agreement of the estimate with the true length (what SSJF
  needs); ties (answers cut at ``max_tokens``) are handled as ties.
- ``binary_accuracy``: share put on the right side of the scored records' median length, by the
  predicted tokens (so it needs the calibration, not only the order).
- ``bucket_accuracy``: share put in their true bucket of 5 equal-mass buckets of the scored lengths.
- ``mae_tokens``: mean absolute error of the predicted length, in served-model tokens.

Baselines: ``training_median`` always predicts the predictor's training median; ``prompt_length_linear``
is a least-squares line through ``log1p(output tokens)`` against ``log1p(prompt tokens)`` fit on the
training split (with ``--split all`` there is none, and only its rank figures are given).

The noise floor (``noise_floor``) scores one sample of the served model as a prediction of another
sample of the same prompts (another seed): no predictor from the prompt alone can beat it on average.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

from bench.labels import LengthRecord
from cluster.predictor.lengths import bin_of, quantile, quantile_boundaries
from cluster.predictor.predictor import LengthPredictor

NUM_LATENCY_CALLS = 30
NUM_WARMUP_CALLS = 3
EQUAL_MASS_QUANTILES = (0.2, 0.4, 0.6, 0.8)
"""5 equal-mass buckets of the scored lengths."""


@dataclass(frozen=True)
class Accuracy:
    spearman: float | None
    """None for a constant prediction, where rank correlation is undefined."""
    kendall_tau: float | None
    binary_accuracy: float | None
    """None when there are no predicted tokens (a rank-only baseline)."""
    bucket_accuracy: float | None
    mae_tokens: float | None


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation, ties given their average rank."""
    rx, ry = _ranks(np.asarray(x, dtype=float)), _ranks(np.asarray(y, dtype=float))
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def kendall_tau(x: list[float], y: list[float]) -> float | None:
    """Kendall's tau-b (ties in either variable accounted for)."""
    from scipy.stats import kendalltau

    if len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(kendalltau(x, y).statistic)


def _ranks(values: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    # Tied values share the mean of the ranks they span: 1-based ranks of distinct values, averaged.
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def score(estimates: list[float], predicted_tokens: list[int] | None, true_tokens: list[int]) -> Accuracy:
    """Accuracy of estimates (any monotone score: ranks) and predicted tokens (the calibrated length,
    or None for a rank-only predictor) against the true lengths and their own median and buckets."""
    truth = [float(t) for t in true_tokens]
    if predicted_tokens is None:
        return Accuracy(spearman(estimates, truth), kendall_tau(estimates, truth), None, None, None)
    lengths = sorted(true_tokens)
    median = quantile(lengths, 0.5)
    edges = quantile_boundaries(lengths, EQUAL_MASS_QUANTILES)
    pairs = list(zip(predicted_tokens, true_tokens, strict=True))
    return Accuracy(
        spearman=spearman(estimates, truth),
        kendall_tau=kendall_tau(estimates, truth),
        binary_accuracy=sum((p > median) == (t > median) for p, t in pairs) / len(pairs),
        bucket_accuracy=sum(bin_of(p, edges) == bin_of(t, edges) for p, t in pairs) / len(pairs),
        mae_tokens=sum(abs(p - t) for p, t in pairs) / len(pairs),
    )


def spearman_ci95(estimates: list[float], true_tokens: list[int], num_resamples: int = 1000) -> list[float]:
    """A 95% bootstrap interval of the Spearman correlation (records resampled with replacement, seeded):
    on a few hundred held-out prompts the figure itself moves by several hundredths. Each record is its own
    group of ``group_bootstrap_ci``, which draws the same resamples."""
    from tools.predictor.near_duplicates import group_bootstrap_ci

    return group_bootstrap_ci(estimates, true_tokens, range(len(true_tokens)), num_resamples)


def baselines(
    predictor: LengthPredictor,
    train: list[LengthRecord],
    scored: list[LengthRecord],
    prompt_tokens: dict[str, int],
) -> dict[str, Accuracy]:
    """The reference predictors; ``prompt_tokens`` maps a prompt to its length in served tokens."""
    true_tokens = [r.output_tokens for r in scored]
    median = predictor.metadata.median_output_tokens
    figures = {"training_median": score([median] * len(scored), [round(median)] * len(scored), true_tokens)}
    log_prompt = [float(np.log1p(prompt_tokens[r.prompt])) for r in scored]
    if len(train) >= 2:
        slope, intercept = np.polyfit(
            [np.log1p(prompt_tokens[r.prompt]) for r in train], [np.log1p(r.output_tokens) for r in train], 1
        )
        linear = [float(intercept + slope * x) for x in log_prompt]
        tokens = [predictor.tokens_from_log(x) for x in linear]
        figures["prompt_length_linear"] = score(linear, tokens, true_tokens)
    else:
        figures["prompt_length_linear"] = score(log_prompt, None, true_tokens)
    return figures


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
    scored: list[LengthRecord],
    prompt_tokens: dict[str, int],
    num_latency_calls: int = NUM_LATENCY_CALLS,
) -> dict[str, object]:
    """The report written by ``binserve eval-predictor``: the predictor's figures, baselines, latency."""
    if not scored:
        raise ValueError(
            "data: no held-out records; use more records (the split holds out by a hash of the id), "
            "or --split all for a file of held-out prompts"
        )
    prompts = [r.prompt for r in scored]
    log_estimates, _ = predictor.predict_log_tokens(prompts)
    accuracy = score(
        log_estimates,
        [predictor.tokens_from_log(x) for x in log_estimates],
        [r.output_tokens for r in scored],
    )
    batch16_ms = p50_latency_ms(predictor, prompts, 16, num_latency_calls)
    metadata = predictor.metadata
    return {
        **asdict(accuracy),
        "spearman_ci95": spearman_ci95(log_estimates, [r.output_tokens for r in scored]),
        "num_held_out": len(scored),
        "p50_latency_ms_batch1": p50_latency_ms(predictor, prompts, 1, num_latency_calls),
        "p50_latency_ms_batch16": batch16_ms,
        "p50_latency_ms_per_request_batch16": batch16_ms / 16,
        "baselines": {
            name: asdict(figures)
            for name, figures in baselines(predictor, train, scored, prompt_tokens).items()
        },
        "num_train_split": len(train),
        "file_median_output_tokens": quantile(sorted(r.output_tokens for r in scored), 0.5),
        "file_bucket_boundaries": quantile_boundaries(
            sorted(r.output_tokens for r in scored), EQUAL_MASS_QUANTILES
        ),
        "predictor_encoder": f"{metadata.encoder}, {metadata.num_encoder_layers} layers",
        "predictor_trained_for": metadata.served_model.name if metadata.served_model else metadata.tokenizer,
    }


def noise_floor(first: list[LengthRecord], second: list[LengthRecord]) -> dict[str, object]:
    """Score sample ``first`` of each prompt as the prediction of sample ``second`` (joined by id)."""
    by_id = {r.record_id: r.output_tokens for r in first}
    joined = [(by_id[r.record_id], r.output_tokens) for r in second if r.record_id in by_id]
    if len(joined) < 2:
        raise ValueError(f"data: the two samples share {len(joined)} record ids; need at least 2")
    predicted = [a for a, _ in joined]
    truth = [b for _, b in joined]
    accuracy = score([float(a) for a in predicted], predicted, truth)
    return {
        **asdict(accuracy),
        "spearman_ci95": spearman_ci95([float(a) for a in predicted], truth),
        "num_prompts": len(joined),
    }
