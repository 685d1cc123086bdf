"""How wrong the length predictor tends to be: the distribution of true / predicted length per band of
predictions, fitted on held-out prompts and shipped next to the predictor (``length_distribution.json``).

    table = DistributionTable.load()                      # the default predictor's
    spread = table.for_prediction(240, max_tokens=512)    # an OutputLengthDistribution for the request
    spread.quantiles(240)                                 # p0, p5, ..., p95, p100 in tokens
    spread.expected_remaining_tokens(240, num_generated=300)

The predictor is a point regression on log length (Spearman about 0.4 on fresh prompts); its errors are
not symmetric around it (it predicts low for short guesses, and many answers stop at the 512-token cap),
so the spread is fitted per band of predicted length, empirically: no parametric law is assumed, and the
cap's atom comes out of the capped quantiles by itself. ``tools/predictor/uncertainty.py`` fits it and
measures its calibration by grouped cross-fitting (docs/PREDICTOR.md). Pure Python.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from cluster.predictor import DEFAULT_DIR
from cluster.predictor.lengths import quantile
from pipeline.length_distribution import OutputLengthDistribution

TABLE_FILE = "length_distribution.json"
LEVELS = tuple(i / 20 for i in range(21))
"""p0, p5, ..., p100: 20 equal slices; a band of ~90 held-out prompts gives each about 4 points."""


@dataclass(frozen=True)
class DistributionTable:
    """Quantiles of true / predicted output length at ``levels``, one row per band of predictions."""

    band_centres: list[float]
    """The median prediction (tokens) of each band, ascending: a request's ratios are interpolated between the
    rows of the two bands whose centres surround its prediction (the first or last row beyond them), so its
    distribution, and its expected length, move smoothly with the prediction rather than jump at a band edge."""
    levels: list[float]
    ratios: list[list[float]]
    """Per band, the quantiles of true / predicted length at ``levels``."""
    max_output_tokens: int
    """The labels' cap: no answer is longer (the distribution's top)."""
    made_by: str = ""
    """How the table was made: the command, the labels, the prompts it was fitted on."""

    def __post_init__(self) -> None:
        if len(self.ratios) != len(self.band_centres) or not self.ratios:
            raise ValueError("ratios: need one row per band (per entry of band_centres)")
        if self.band_centres != sorted(self.band_centres):
            raise ValueError(f"band_centres: must ascend, got {self.band_centres}")
        for row in self.ratios:  # checks levels and ratios once, at load
            OutputLengthDistribution(tuple(self.levels), tuple(row), self.max_output_tokens)

    @classmethod
    def fit(
        cls,
        predicted_tokens: Sequence[int],
        true_tokens: Sequence[int],
        max_output_tokens: int,
        num_bands: int = 3,
        levels: Sequence[float] = LEVELS,
        made_by: str = "",
    ) -> DistributionTable:
        """Bands at equal-count quantiles of the predictions; per band, the empirical quantiles of the ratio."""
        if len(predicted_tokens) != len(true_tokens) or len(true_tokens) < num_bands:
            raise ValueError("predicted_tokens, true_tokens: need equal lengths, at least one per band")
        by_prediction = sorted(predicted_tokens)
        edges = [int(quantile(by_prediction, b / num_bands)) for b in range(1, num_bands)]
        members: list[list[float]] = [[] for _ in range(num_bands)]
        band_predictions: list[list[int]] = [[] for _ in range(num_bands)]
        for predicted, true in zip(predicted_tokens, true_tokens, strict=True):
            band = bisect.bisect_left(edges, predicted)
            members[band].append(true / max(1, predicted))
            band_predictions[band].append(predicted)
        if any(not m for m in members):
            raise ValueError(f"band_edges: a band is empty (edges {edges}); use fewer bands")
        ratios = [[quantile(sorted(m), level) for level in levels] for m in members]
        centres = [quantile(sorted(p), 0.5) for p in band_predictions]
        return cls(centres, list(levels), ratios, max_output_tokens, made_by)

    def for_prediction(
        self, predicted_tokens: int, max_tokens: int | None = None
    ) -> OutputLengthDistribution:
        """The spread of a request predicted ``predicted_tokens`` long, capped at its ``max_tokens``."""
        centres = self.band_centres
        upper = bisect.bisect_left(centres, predicted_tokens)
        if upper == 0 or upper == len(centres):
            row = self.ratios[min(upper, len(centres) - 1)]
        else:  # between two centres: a convex combination of non-decreasing rows is non-decreasing
            low, high = centres[upper - 1], centres[upper]
            weight = (predicted_tokens - low) / (high - low)
            row = [
                (1 - weight) * a + weight * b
                for a, b in zip(self.ratios[upper - 1], self.ratios[upper], strict=True)
            ]
        spread = OutputLengthDistribution(tuple(self.levels), tuple(row), self.max_output_tokens)
        return spread if max_tokens is None else spread.capped(max_tokens)

    @classmethod
    def load(cls, directory: str | Path = DEFAULT_DIR) -> DistributionTable:
        path = Path(directory) / TABLE_FILE
        if not path.is_file():
            raise ValueError(f"predictor: no {TABLE_FILE} in {directory}")
        return cls(**json.loads(path.read_text()))

    @classmethod
    def of_predictor(cls, directory: str | Path | None) -> DistributionTable | None:
        """The table shipped with the predictor in ``directory`` (``predictor_dir``'s names allowed), or None
        if it has none."""
        from cluster.predictor import predictor_dir

        directory = predictor_dir(directory)
        return cls.load(directory) if (directory / TABLE_FILE).is_file() else None

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / TABLE_FILE
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return path
