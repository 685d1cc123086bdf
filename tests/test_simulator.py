"""The simulator: Multi-Bin's closed form, and agreement with the real engine on this machine."""

from __future__ import annotations

import random

import pytest

from bench.metrics import summarize
from bench.replay import replay
from bench.sim.cost_model import StepCostModel
from bench.sim.simulator import ClusterSimulator, SimConfig, SimRequest
from bench.workload import sharegpt_requests
from cluster.router import BinRouter
from pipeline.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pipeline.request import Request, SamplingParams
from workers.llm import LLM

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


@pytest.mark.parametrize("routing", ["fewest_requests", "power_of_two", "least_predicted_work"])
def test_every_replica_routing_serves_every_request_on_every_replica(routing: str) -> None:
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
    assert sim._choose_replica(sim.pools[0], work_tokens=1000) is second
    assert sim._choose_replica(sim.pools[0], work_tokens=10) is first


def test_simulator_agrees_with_the_real_engine(tiny_llama: str) -> None:
    """Same workload, same policy: throughput and mean completion time within 10%. The cost model is
    fitted to the real run's own step times, so this checks that the simulator schedules exactly as the
    engine does and that a linear step-cost model captures this machine."""
    config = EngineConfig(
        ModelConfig(tiny_llama, max_model_len=512),
        cache=CacheConfig(kv_cache_bytes=32 * 2**20),
        scheduler=SchedulerConfig(chunk_size=64, max_num_seqs=16),
    )
    llm = LLM(config)
    workload = sharegpt_requests(llm.tokenizer, 32, seed=5, max_prompt_tokens=128, max_output_tokens=48)
    real = replay(llm.engine, workload)
    cost_model = StepCostModel.fit(real.features, real.step_times_s)
    _assert_simulator_agrees(llm, workload, real, cost_model)


def _assert_simulator_agrees(llm: LLM, workload, real, cost_model: StepCostModel) -> None:
    """The simulator, under ``cost_model``, on the engine's own configuration and ``workload`` (arrival
    times included): throughput and mean completion time within 10% of the ``real`` replay's."""
    config = llm.config
    sim = ClusterSimulator(
        SimConfig(
            scheduler=config.scheduler,
            num_blocks=llm.runner.num_blocks,
            max_model_len=config.model.max_model_len,
        ),
        cost_model,
    )
    simulated = sim.run([SimRequest(r.arrival_s, len(r.prompt_token_ids), r.output_tokens) for r in workload])
    real_summary, sim_summary = summarize(real.metrics), summarize(simulated)
    assert sim_summary.output_tokens_per_s == pytest.approx(real_summary.output_tokens_per_s, rel=0.10)
    assert sim_summary.mean_jct_s == pytest.approx(real_summary.mean_jct_s, rel=0.10)


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


def test_simulator_predicts_the_real_engine_on_smollm2(smollm2: str) -> None:
    """The calibrated simulator on the real model: a cost model fitted by ``binserve profile``'s procedure
    on one workload (a burst, under sarathi and prefill_first) predicts a *different* workload (other
    requests, Poisson arrivals, continuous batching) within 10% on throughput and mean completion time.
    Both are measured in this run on this machine, so the check holds on any machine's speed."""
    from bench.sim.profile import profile_engine
    from bench.workload import poisson_arrivals, with_arrivals

    config = EngineConfig(
        ModelConfig(smollm2, max_model_len=512),
        cache=CacheConfig(kv_cache_bytes=64 * 2**20),
        scheduler=SchedulerConfig(chunk_size=128, max_num_seqs=8),
    )
    llm = LLM(config)
    calibration = sharegpt_requests(llm.tokenizer, 12, seed=1, max_prompt_tokens=192, max_output_tokens=40)
    cost_model = profile_engine(config, calibration)
    workload = sharegpt_requests(llm.tokenizer, 16, seed=2, max_prompt_tokens=192, max_output_tokens=40)
    workload = with_arrivals(workload, poisson_arrivals(len(workload), rate_per_s=4.0, seed=2))
    _assert_simulator_agrees(llm, workload, replay(llm.engine, workload), cost_model)
