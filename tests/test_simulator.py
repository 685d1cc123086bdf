"""The simulator: Multi-Bin's closed form, routing and batching bookkeeping (its agreement with the real engine
on this machine is a benchmark: `binserve bench sim-agreement`)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

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


BLOCK_SIZE = 16


def _engine_turns(
    prompt: tuple[int, ...], num_answer: int, user: tuple[int, ...]
) -> tuple[tuple[int, ...], int]:
    """Two turns of one conversation through the real engine (a fake model) with prefix caching: turn 1's
    answer, and how many of turn 2's prompt tokens (turn 1's prompt and answer, then ``user``) it found cached."""
    from pipeline.engine import Engine
    from pipeline.scheduler import Scheduler
    from tests.fake_runner import FakeRunner

    scheduler = Scheduler(
        SchedulerConfig(), 64, BLOCK_SIZE, 4096, eos_token_ids=(), enable_prefix_caching=True
    )
    engine = Engine(FakeRunner(64, BLOCK_SIZE, vocab_size=10_000), scheduler)

    def serve(request_id: str, prompt: tuple[int, ...], max_tokens: int):
        engine.add_request(
            NewRequest(request_id, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        )
        tokens = []
        while True:
            for out in engine.advance() or ():
                tokens += out.new_token_ids
                if out.metrics is not None:
                    return tuple(tokens), out.metrics

    answer, _ = serve("t1", prompt, num_answer)
    _, metrics = serve("t2", prompt + answer + user, 1)
    return answer, metrics.num_cached_tokens


@dataclass
class _RecordingCost:
    """The unit step, recording each plan's prefill tokens per request."""

    prefill_tokens: dict[str, int] = field(default_factory=dict)

    def step_time_s(self, plan) -> float:
        for chunk in plan.chunks:
            if not chunk.is_decode:
                self.prefill_tokens[chunk.request_id] = (
                    self.prefill_tokens.get(chunk.request_id, 0) + chunk.num_tokens
                )
        return UNIT_STEP.step_time_s(plan)


@pytest.mark.parametrize("num_answer", [13, 24])
def test_a_follow_up_turn_hits_what_the_engine_would_and_computes_only_the_rest(num_answer: int) -> None:
    # 40 + 13 = 53 tokens: 3 full blocks. 40 + 24 = 64 = 4 blocks, but the last answer token is never fed back,
    # so its KV (and the 4th block's name) is never computed: 3 blocks again.
    prompt, user = tuple(range(1000, 1040)), tuple(range(2000, 2007))
    answer, engine_hit = _engine_turns(prompt, num_answer, user)
    follow_up = prompt + answer + user
    requests = [
        SimRequest(0.0, len(prompt), num_answer, prompt_token_ids=prompt, output_token_ids=answer),
        SimRequest(1.0, len(follow_up), 1, prompt_token_ids=follow_up, output_token_ids=(7,), follows=0),
    ]
    cost = _RecordingCost()
    config = SimConfig(block_size=BLOCK_SIZE, enable_prefix_caching=True)
    first, second = ClusterSimulator(config, cost).run(requests)
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == engine_hit == (len(prompt) + num_answer - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert second.arrival_s == first.finished_s + 1.0  # sent a think time after the answer
    # The cost model is charged the uncached prompt only; with caching off, all of it.
    assert cost.prefill_tokens["1"] == len(follow_up) - engine_hit
    off = _RecordingCost()
    ClusterSimulator(SimConfig(block_size=BLOCK_SIZE), off).run(requests)
    assert off.prefill_tokens["1"] == len(follow_up)


@pytest.mark.parametrize("seed", range(4))
def test_least_cost_sends_a_follow_up_to_the_replica_holding_its_history(seed: int) -> None:
    # Two conversations start together on two replicas (one each: the book counts the first where it went);
    # both finish, so loads are equal when the follow-ups come, and each goes where its history is cached.
    def conversation(first_id: int, index: int) -> list[SimRequest]:
        prompt = tuple(range(first_id, first_id + 64))
        answer = tuple(range(first_id + 100, first_id + 120))
        follow_up = prompt + answer + (5, 6, 7)
        return [
            SimRequest(0.0, 64, 20, prompt_token_ids=prompt, output_token_ids=answer),
            SimRequest(
                2.0,
                len(follow_up),
                4,
                prompt_token_ids=follow_up,
                output_token_ids=(1, 2, 3, 4),
                follows=index,
            ),
        ]

    a1, a2 = conversation(1000, 0)
    b1, b2 = conversation(5000, 1)
    config = SimConfig(num_replicas=2, enable_prefix_caching=True, replica_routing="least_cost", seed=seed)
    sim = ClusterSimulator(config, UNIT_STEP)
    metrics = sim.run([a1, b1, a2, b2])
    where = sim.replica_of_request
    assert where[0] != where[1]
    assert (where[2], where[3]) == (where[0], where[1])
    assert [m.num_cached_tokens for m in metrics[2:]] == [80, 80]
