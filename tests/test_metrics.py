"""Metric definitions on hand-computed examples."""

from __future__ import annotations

import math

import pytest

from bench.request_stats import Slo, find_capacity, percentile, summarize
from pipeline.engine import RequestMetrics


def record(arrival: float, tokens: tuple[float, ...], admitted: float | None = None) -> RequestMetrics:
    return RequestMetrics(
        arrival_s=arrival,
        admitted_s=arrival if admitted is None else admitted,
        token_times_s=tokens,
        finished_s=tokens[-1],
        num_prompt_tokens=10,
        num_output_tokens=len(tokens),
        num_preemptions=0,
        predicted_output_tokens=None,
        bin_id=0,
    )


def test_percentile_interpolates_linearly() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([4, 1, 3, 2], 0) == 1 and percentile([1, 2, 3, 4], 100) == 4
    assert percentile([10, 20], 99) == pytest.approx(19.9)
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="q: must be in"):
        percentile([1], 101)


def test_summary_on_a_hand_computed_example() -> None:
    # a: arrives 0, admitted 0.5, tokens at 1, 2, 4 -> JCT 4, TTFT 1, gaps 1, 2
    # b: arrives 1, admitted 1, tokens at 2, 3    -> JCT 2, TTFT 1, gap 1
    s = summarize([record(0.0, (1.0, 2.0, 4.0), admitted=0.5), record(1.0, (2.0, 3.0))])
    assert s.makespan_s == 4.0
    assert s.output_tokens_per_s == 5 / 4 and s.requests_per_s == 2 / 4
    assert s.mean_jct_s == 3.0 and s.p50_jct_s == 3.0 and s.p99_jct_s == pytest.approx(3.98)
    assert s.mean_ttft_s == 1.0 and s.p99_ttft_s == 1.0
    assert s.p50_tbt_s == 1.0 and s.p99_tbt_s == pytest.approx(1.98)
    assert s.mean_queueing_s == 0.25


def test_capacity_search_finds_the_slo_edge() -> None:
    # A fake system whose p99 TTFT grows with the rate: 0.1 s per request/s.
    def run(rate: float):
        return summarize([record(0.0, (0.1 * rate, 0.1 * rate + 0.01))])

    capacity = find_capacity(run, Slo(p99_ttft_s=1.0, p99_tbt_s=1.0), 1.0, 100.0, iterations=20)
    assert capacity == pytest.approx(10.0, abs=1e-3)
    assert find_capacity(run, Slo(p99_ttft_s=0.01, p99_tbt_s=1.0), 1.0, 100.0) == 0.0
