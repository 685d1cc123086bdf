"""A request's output length as a distribution around its point prediction, and the work it leaves.

    spread = OutputLengthDistribution(levels=(0.0, 0.5, 1.0), ratios=(0.2, 1.0, 3.0), max_tokens=512)
    spread.quantiles(point_tokens=100)                  # (20.0, 100.0, 300.0): p0, p50, p100
    spread.expected_remaining_tokens(100, num_generated=150)   # E[L - 150 | L > 150]

The length predictor's point guess says little about one answer (Spearman about 0.4 on fresh prompts), but
how wrong it tends to be is known: ``cluster/predictor/distribution.py`` fits, per band of predictions,
the quantiles of true / predicted length on held-out prompts. A request carries those ratios; its length
distribution is the point prediction (or the length probe's refinement of it, a shift of the location)
times the ratios, capped at ``max_tokens``. The quantile function is piecewise linear between the levels
(a piecewise-uniform density; flat stretches are atoms, such as the many answers cut at the cap), so the
expected remaining length given the tokens already generated has a closed form. Pure Python: the
scheduler's queues use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise


@dataclass(frozen=True)
class OutputLengthDistribution:
    """The quantile function of a request's output length, relative to its point prediction."""

    levels: tuple[float, ...]
    """Ascending probability levels from 0 to 1 (the knots of the piecewise-linear quantile function)."""
    ratios: tuple[float, ...]
    """True length / point prediction at each level (non-decreasing); the last one is ignored, since the
    top of the distribution is ``max_tokens``: a request may always run to its cap."""
    max_tokens: int
    """The most tokens an answer may have (the labels' ``max_tokens``, or the request's if lower)."""

    def __post_init__(self) -> None:
        if len(self.levels) < 2 or len(self.levels) != len(self.ratios):
            raise ValueError("levels, ratios: need the same number (at least 2) of each")
        if self.levels[0] != 0.0 or self.levels[-1] != 1.0:
            raise ValueError(f"levels: must run from 0 to 1, got {self.levels[0]} to {self.levels[-1]}")
        if any(b <= a for a, b in pairwise(self.levels)):
            raise ValueError(f"levels: must strictly ascend, got {self.levels}")
        if self.ratios[0] < 0 or any(b < a for a, b in pairwise(self.ratios)):
            raise ValueError(f"ratios: must be >= 0 and non-decreasing, got {self.ratios}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {self.max_tokens}")

    def capped(self, max_tokens: int) -> OutputLengthDistribution:
        """The same spread for a request that may not exceed ``max_tokens``."""
        return OutputLengthDistribution(self.levels, self.ratios, min(self.max_tokens, max_tokens))

    def quantiles(self, point_tokens: float) -> tuple[float, ...]:
        """The length (tokens) at each level for this point prediction: monotone, between 1 and the cap."""
        inner = [min(self.max_tokens, max(1.0, point_tokens * r)) for r in self.ratios[:-1]]
        return (*inner, float(self.max_tokens))

    def quantile(self, point_tokens: float, level: float) -> float:
        """The length at any ``level`` in [0, 1], interpolated between the knots."""
        if not 0.0 <= level <= 1.0:
            raise ValueError(f"level: must be in [0, 1], got {level}")
        knots = self.quantiles(point_tokens)
        for i in range(1, len(self.levels)):
            if level <= self.levels[i]:
                low, high = self.levels[i - 1], self.levels[i]
                return knots[i - 1] + (knots[i] - knots[i - 1]) * (level - low) / (high - low)
        return knots[-1]

    def expected_remaining_tokens(self, point_tokens: float, num_generated: int) -> float:
        """E[L - g | L > g] for ``g = num_generated``: the mean output still to come of a request that has
        not finished after g tokens. 0 once g reaches the cap."""
        return expected_excess(self.levels, self.quantiles(point_tokens), num_generated)


def expected_excess(levels: Sequence[float], knots: Sequence[float], threshold: float) -> float:
    """E[X - t | X > t] for X whose quantile function is piecewise linear through (levels, knots): the
    integral of Q(u) - t over the levels where Q(u) > t, divided by their measure. 0 if X never exceeds t."""
    area = 0.0
    mass = 0.0
    for i in range(1, len(levels)):
        u0, u1 = levels[i - 1], levels[i]
        q0, q1 = knots[i - 1] - threshold, knots[i] - threshold
        if q1 <= 0:
            continue
        if q0 < 0:  # the segment crosses t: keep only its part above
            u0 = u0 + (u1 - u0) * (-q0) / (q1 - q0)
            q0 = 0.0
        area += (u1 - u0) * (q0 + q1) / 2
        mass += u1 - u0
    return area / mass if mass > 0 else 0.0
