"""Serving metrics, defined once and used by every benchmark, the simulator and the report.

- throughput: output tokens/s and requests/s over the makespan (first arrival to last finish);
- job completion time (JCT): arrival to last token; mean, p50, p99;
- TTFT: arrival to first token; mean, p50, p99;
- TBT: gaps between consecutive tokens of a request, pooled over all requests; p50, p99;
- queueing delay: arrival to admission (first KV blocks);
- capacity: the highest arrival rate whose run meets a TTFT/TBT SLO (``find_capacity``).

Percentiles interpolate linearly between order statistics (numpy's default), so p50 of [1, 2, 3, 4]
is 2.5.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from pipeline.engine import RequestMetrics


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"q: must be in [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class MetricsSummary:
    num_requests: int
    makespan_s: float
    output_tokens_per_s: float
    requests_per_s: float
    mean_jct_s: float
    p50_jct_s: float
    p99_jct_s: float
    mean_ttft_s: float
    p50_ttft_s: float
    p99_ttft_s: float
    p50_tbt_s: float
    p99_tbt_s: float
    mean_queueing_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(records: Sequence[RequestMetrics]) -> MetricsSummary:
    if not records:
        raise ValueError("records: need at least one finished request")
    start_s = min(r.arrival_s for r in records)
    makespan_s = max(r.finished_s for r in records) - start_s
    jct = [r.completion_s for r in records]
    ttft = [r.ttft_s for r in records if r.ttft_s is not None]
    tbt = [gap for r in records for gap in r.tbt_s]
    queueing = [r.queueing_s for r in records if r.queueing_s is not None]
    rate = 1.0 / makespan_s if makespan_s > 0 else math.inf
    return MetricsSummary(
        num_requests=len(records),
        makespan_s=makespan_s,
        output_tokens_per_s=sum(r.num_output_tokens for r in records) * rate,
        requests_per_s=len(records) * rate,
        mean_jct_s=statistics.fmean(jct),
        p50_jct_s=percentile(jct, 50),
        p99_jct_s=percentile(jct, 99),
        mean_ttft_s=statistics.fmean(ttft) if ttft else math.nan,
        p50_ttft_s=percentile(ttft, 50),
        p99_ttft_s=percentile(ttft, 99),
        p50_tbt_s=percentile(tbt, 50),
        p99_tbt_s=percentile(tbt, 99),
        mean_queueing_s=statistics.fmean(queueing) if queueing else math.nan,
    )


@dataclass(frozen=True)
class Slo:
    """The bounds a run must meet; a bound left unset (infinite) is not checked."""

    p99_ttft_s: float = math.inf
    p99_tbt_s: float = math.inf
    mean_jct_s: float = math.inf

    def is_met(self, summary: MetricsSummary) -> bool:
        return (
            summary.p99_ttft_s <= self.p99_ttft_s
            and summary.p99_tbt_s <= self.p99_tbt_s
            and summary.mean_jct_s <= self.mean_jct_s
        )


def find_capacity(
    run_at_rate: Callable[[float], MetricsSummary],
    slo: Slo,
    low_rate: float,
    high_rate: float,
    iterations: int = 12,
) -> float:
    """The highest arrival rate (requests/s) in [low, high] meeting ``slo``, by bisection (SLO
    attainment is taken as monotone in the rate); 0 if even ``low_rate`` misses it."""
    if not 0 < low_rate < high_rate:
        raise ValueError(f"rates: need 0 < low_rate < high_rate, got {low_rate}, {high_rate}")
    if not slo.is_met(run_at_rate(low_rate)):
        return 0.0
    if slo.is_met(run_at_rate(high_rate)):
        return high_rate
    for _ in range(iterations):
        mid = (low_rate + high_rate) / 2
        if slo.is_met(run_at_rate(mid)):
            low_rate = mid
        else:
            high_rate = mid
    return low_rate
