"""Output-length buckets and bins: pure Python, no torch, so the router and the SSJF queue can import it.

Two ways of cutting the length axis, both learned from the training-length distribution:

- *buckets*: the predictor's classes, cut at the training quantiles p25/p50/p75/p99 (5 buckets), as in
  the SSJF paper (Qiu et al., 2024).
- *bins*: ``k`` equal-probability-mass intervals for multi-bin batching, cut on demand for any ``k``.

Both are ascending lists of inclusive upper edges, and ``bin_of`` maps a length to its interval:
interval ``i`` holds lengths ``edges[i-1] < n <= edges[i]``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

BUCKET_QUANTILES = (0.25, 0.50, 0.75, 0.99)


@dataclass(frozen=True)
class Prediction:
    """The predictor's answer for a batch of prompts, in the prompts' order."""

    output_tokens: list[int]
    """Predicted number of output tokens under the served model's tokenizer (at least 1)."""
    bucket_ids: list[int]
    """Predicted bucket, 0 .. len(bucket_boundaries); see ``bin_of``."""


def quantile(sorted_values: Sequence[int], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of an ascending, non-empty sequence."""
    if not sorted_values:
        raise ValueError("sorted_values: must not be empty")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q: must be in [0, 1], got {q}")
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def quantile_boundaries(sorted_lengths: Sequence[int], quantiles: Sequence[float]) -> list[int]:
    """Integer upper edges (inclusive) at the given quantiles of an ascending length sample."""
    return [int(math.floor(quantile(sorted_lengths, q))) for q in quantiles]


def bin_of(output_tokens: float, boundaries: Sequence[int]) -> int:
    """Index of the interval holding ``output_tokens``: the number of edges strictly below it."""
    return bisect.bisect_left(boundaries, output_tokens)


def equal_mass_boundaries(sorted_lengths: Sequence[int], num_bins: int) -> list[int]:
    """``num_bins - 1`` inclusive upper edges splitting the length sample into equal-mass bins.

    Ties can make two edges equal (a spike of identical lengths); the bins then stay equal in
    *quantile*, and ``bin_of`` puts the tied lengths in the lower one.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins: must be at least 1, got {num_bins}")
    return quantile_boundaries(sorted_lengths, [i / num_bins for i in range(1, num_bins)])
