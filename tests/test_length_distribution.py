"""The predicted length distribution: monotone quantiles, a non-negative expected remaining length that
matches a brute-force computation, the shipped table, and the ``expected_remaining`` order's ranking."""

from __future__ import annotations

import random
from itertools import pairwise

import pytest

from cluster.predictor.distribution import DistributionTable
from pipeline.length_distribution import OutputLengthDistribution
from pipeline.policies import ExpectedRemainingQueue, WaitBound
from pipeline.request import NewRequest, Request, SamplingParams

HEAVY = OutputLengthDistribution(
    levels=(0.0, 0.1, 0.5, 0.8, 0.9, 1.0), ratios=(0.1, 0.4, 1.0, 2.0, 4.0, 4.0), max_tokens=512
)
"""A right-skewed spread with an atom at the cap for points above 128 (p90 = 4 x point)."""


def brute_force_remaining(spread: OutputLengthDistribution, point: float, generated: int) -> float:
    """E[L - g | L > g] from a fine grid of the quantile function (each grid level equally likely)."""
    n = 20_000
    lengths = [spread.quantile(point, (i + 0.5) / n) for i in range(n)]
    over = [x - generated for x in lengths if x > generated]
    return sum(over) / len(over) if over else 0.0


@pytest.mark.parametrize("point", [5, 60, 200, 600])
def test_quantiles_are_monotone_and_within_one_and_the_cap(point: int) -> None:
    knots = HEAVY.quantiles(point)
    assert list(knots) == sorted(knots)
    assert knots[0] >= 1 and knots[-1] == 512
    levels = [i / 100 for i in range(101)]
    values = [HEAVY.quantile(point, q) for q in levels]
    assert values == sorted(values)


@pytest.mark.parametrize(
    ("point", "generated"), [(60, 0), (60, 30), (60, 150), (200, 0), (200, 500), (600, 100)]
)
def test_expected_remaining_matches_brute_force(point: int, generated: int) -> None:
    exact = HEAVY.expected_remaining_tokens(point, generated)
    assert exact == pytest.approx(brute_force_remaining(HEAVY, point, generated), rel=2e-3, abs=1e-2)


def test_expected_remaining_is_non_negative_and_shrinks_past_the_upper_quantiles() -> None:
    point = 100
    remaining = [HEAVY.expected_remaining_tokens(point, g) for g in range(0, 520)]
    assert min(remaining) >= 0 and remaining[-1] == 0.0
    p90 = HEAVY.quantile(point, 0.9)  # 400: past it only the last slice, uniform up to the cap, is left
    tail = remaining[int(p90) :]
    assert all(b <= a for a, b in pairwise(tail))
    assert remaining[int(p90)] == pytest.approx((512 - p90) / 2)


def test_a_cap_lowers_the_top_and_the_mean() -> None:
    capped = HEAVY.capped(150)
    assert capped.quantiles(100)[-1] == 150
    assert capped.expected_remaining_tokens(100, 0) < HEAVY.expected_remaining_tokens(100, 0)


def test_bad_tables_are_refused() -> None:
    with pytest.raises(ValueError, match="levels: must run from 0 to 1"):
        OutputLengthDistribution((0.1, 1.0), (1.0, 2.0), 10)
    with pytest.raises(ValueError, match="ratios: must be >= 0 and non-decreasing"):
        OutputLengthDistribution((0.0, 1.0), (2.0, 1.0), 10)


def test_table_fits_ratio_quantiles_per_band_and_round_trips(tmp_path) -> None:
    rng = random.Random(0)
    predicted = [rng.choice([50, 100, 300]) for _ in range(600)]
    true = [min(512, max(1, round(p * rng.lognormvariate(0.3 if p < 200 else -0.2, 0.5)))) for p in predicted]
    table = DistributionTable.fit(predicted, true, max_output_tokens=512, num_bands=2)
    short, long = table.for_prediction(50), table.for_prediction(300)
    assert short.ratios[10] > 1.1 and long.ratios[10] < 1.0  # each band's median ratio, ~exp(0.3), ~exp(-0.2)
    assert table.for_prediction(300, max_tokens=64).max_tokens == 64
    table.save(tmp_path)
    assert DistributionTable.load(tmp_path) == table


def test_shipped_table_loads_with_monotone_rows(tmp_path) -> None:
    table = DistributionTable.load()
    assert DistributionTable.of_predictor(None) == table
    assert DistributionTable.of_predictor(tmp_path) is None  # a predictor without a table sends none
    for edge in (0, *table.band_centres, 512):
        knots = table.for_prediction(round(edge)).quantiles(max(1, edge))
        assert list(knots) == sorted(knots)


def request(request_id: str, predicted: int, spread: OutputLengthDistribution | None) -> Request:
    new = NewRequest(request_id, (1, 2, 3, 4), SamplingParams(max_tokens=512), predicted, 0, (), spread)
    return Request.of(new, arrival_s=0.0)


def test_expected_remaining_queue_ranks_by_the_mean_and_falls_back_to_the_point() -> None:
    queue = ExpectedRemainingQueue(WaitBound(s_per_token=0.01, floor_s=1e9, service_multiple=0.0))
    tight = request("tight", 100, OutputLengthDistribution((0.0, 0.99, 1.0), (1.0, 1.0, 1.0), 512))
    skewed = request("skewed", 80, HEAVY)  # mean well above 80: the tail to 4x and to the cap
    point_only = request("point", 120, None)
    for r in (tight, skewed, point_only):
        queue.add(r)
    assert tight.expected_remaining_tokens == pytest.approx(0.99 * 100 + 0.01 * (100 + 512) / 2)
    assert point_only.expected_remaining_tokens == 120
    assert skewed.expected_remaining_tokens > 120
    assert [r.request_id for r in queue.ordered(1.0)] == ["tight", "point", "skewed"]


def test_expected_remaining_follows_the_probe_and_the_tokens_generated() -> None:
    r = request("r", 100, HEAVY)
    fresh = r.expected_remaining_tokens
    r.refined_output_tokens = 300  # the probe moved the location
    assert r.expected_remaining_tokens > fresh
    r.token_ids += [5] * 511  # one token short of the cap
    assert r.expected_remaining_tokens == 1.0  # at least one while unfinished
