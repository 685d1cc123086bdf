"""The simulator: Multi-Bin's closed form, routing and batching bookkeeping (its agreement with the real engine
on this machine is a benchmark: `binserve bench sim-agreement`)."""

from __future__ import annotations

import random

import pytest

from bench.request_stats import summarize
from bench.sim.cost_model import StepCostModel
from bench.sim.simulator import ClusterSimulator, SimConfig, SimRequest
from cluster.router import BinRouter
from pipeline.config import SchedulerConfig
from pipeline.request import NewRequest, Request, SamplingParams

UNIT_STEP = StepCostModel(base_s=1.0, prefill_token_s=0.0, decode_token_s=0.0, kv_token_s=0.0)


def closed_form_batch_time(l_min: float, l_max: float, batch: int, bins: int) -> float:
    """Multi-Bin batching: expected time of a static batch of B uniform lengths drawn from one of k
    equal-mass bins."""
    return l_min + (l_max - l_min) * ((bins - 1) / (2 * bins) + batch / (bins * (batch + 1)))


@pytest.mark.parametrize("bins", [1, 2, 4, 8])
def test_simulated_multibin_throughput_matches_the_closed_form(bins: int) -> None:
    l_min, l_max, batch, num_requests = 0, 256, 8, 2048
    edges = [l_min + (l_max - l_min) * i // bins for i in range(1, bins)]
    rng = random.Random(bins)
    # Stratified: every bin gets the same number of requests, a multiple of B, so no batch is partial.
    lows = [l_min, *edges]
    highs = [*edges, l_max]
    lengths = [
        rng.randint(lo + 1, hi)
        for lo, hi in zip(lows, highs, strict=True)
        for _ in range(num_requests // bins)
    ]
    rng.shuffle(lengths)
    requests = [SimRequest(arrival_s=0.0, prompt_tokens=1, output_tokens=n) for n in lengths]
    scheduler = SchedulerConfig(policy="static", max_num_seqs=batch, group_by_bin=True)
    sim = ClusterSimulator(SimConfig(scheduler=scheduler), UNIT_STEP, BinRouter.build(edges, num_pools=1))
    summary = summarize(sim.run(requests))
    expected_rps = batch / closed_form_batch_time(l_min, l_max, batch, bins)
    assert summary.requests_per_s == pytest.approx(expected_rps, rel=0.03)


def test_simulator_routes_bins_to_pools_and_balances_replicas() -> None:
    router = BinRouter.build([10, 100], num_pools=3)
    sim = ClusterSimulator(SimConfig(num_replicas=6), UNIT_STEP, router)
    requests = [SimRequest(0.0, 4, n) for n in (5, 50, 500) * 4]
    metrics = sim.run(requests)
    assert [m.bin_id for m in metrics] == [0, 1, 2] * 4
    assert all(len(r.scheduler.requests) == 0 for r in sim.replicas)
    assert [round(r.busy_s) > 0 for r in sim.replicas] == [True] * 6


@pytest.mark.parametrize("routing", [None, "power_of_two", "least_predicted_work"])
def test_every_replica_routing_serves_every_request_on_every_replica(routing: str | None) -> None:
    sim = ClusterSimulator(SimConfig(num_replicas=4, replica_routing=routing), UNIT_STEP)
    requests = [SimRequest(0.1 * i, 4, n) for i, n in enumerate((5, 500, 50) * 8)]
    metrics = sim.run(requests)
    assert len(metrics) == len(requests)
    assert all(r.busy_s > 0 for r in sim.replicas)


def test_least_predicted_work_sends_a_long_request_past_a_busy_replica() -> None:
    # One replica holds a 900-token request, the other two 20-token ones: Serve's count says the first, the
    # predicted work says the second (and a 10-token request the first, where it meets 10 tokens, not 20).
    config = SimConfig(num_replicas=2, replica_routing="least_predicted_work", routing_stats_period_s=0.0)
    sim = ClusterSimulator(config, UNIT_STEP)
    first, second = sim.replicas
    for i, (replica, n) in enumerate([(first, 900), (second, 20), (second, 20)]):
        replica.scheduler.add(
            Request(str(i), [0], SamplingParams(max_tokens=n), 0.0, predicted_output_tokens=n)
        )
    assert sim._choose_replica(sim.pools[0], _new(work_tokens=1000)) is second
    assert sim._choose_replica(sim.pools[0], _new(work_tokens=10)) is first


def _new(work_tokens: int) -> NewRequest:
    """A one-token prompt of ``work_tokens`` predicted work in all."""
    return NewRequest(
        "new", (1,), SamplingParams(max_tokens=work_tokens), predicted_output_tokens=work_tokens - 1
    )


def test_the_agreement_benchmark_reports_every_repeat(tiny_llama: str) -> None:
    """The simulator-vs-engine agreement is a benchmark (`binserve bench sim-agreement`): both sides are timings
    of a shared machine. Here only its bookkeeping: one record per repeat, alternating which run comes first."""
    from bench.sim.agreement import run_agreement

    report = run_agreement(tiny_llama, repeats=2, num_requests=4, max_output_tokens=8)
    assert [r["calibration_first"] for r in report["runs"]] == [True, False]
    for run in report["runs"]:
        assert run["real_output_tokens_per_s"] > 0 and run["sim_output_tokens_per_s"] > 0
        assert run["throughput_error"] == run["sim_output_tokens_per_s"] / run["real_output_tokens_per_s"] - 1


def test_replicas_are_split_over_pools_by_work() -> None:
    from bench.sim.simulator import replicas_per_pool

    assert replicas_per_pool(16, [1, 1, 1, 1]) == (4, 4, 4, 4)
    assert replicas_per_pool(16, [1, 2, 4, 9]) == (2, 2, 4, 8)  # one each, then 12 by weight
    assert replicas_per_pool(4, [100, 1, 1, 1]) == (1, 1, 1, 1)
    assert sum(replicas_per_pool(16, [0.3, 0.3, 0.4])) == 16
    with pytest.raises(ValueError, match="num_replicas"):
        replicas_per_pool(2, [1, 1, 1])


def test_a_burst_forms_one_static_batch() -> None:
    scheduler = SchedulerConfig(policy="static", max_num_seqs=4)
    sim = ClusterSimulator(SimConfig(scheduler=scheduler), UNIT_STEP)
    metrics = sim.run([SimRequest(0.0, 1, 5) for _ in range(4)])
    assert {m.admitted_s for m in metrics} == {0.0}
