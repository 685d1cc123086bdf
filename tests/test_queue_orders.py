"""The queue orders that hold the tail (``ssjf_bounded``, ``hrrn``): their ranking, and the wait bound kept
with the fake runner while short requests keep arriving below capacity."""

from __future__ import annotations

import random

import pytest

from pipeline.config import QueueOrder, SchedulerConfig
from pipeline.engine import Engine
from pipeline.length_distribution import OutputLengthDistribution
from pipeline.policies import BoundedSSJFQueue, HRRNQueue, SSJFQueue, WaitBound, waiting_queue
from pipeline.request import NewRequest, Request, SamplingParams
from pipeline.scheduler import Scheduler
from tests.fake_runner import FakeRunner

SPREAD = OutputLengthDistribution(levels=(0.0, 0.5, 0.9, 1.0), ratios=(0.5, 1.0, 2.0, 2.0), max_tokens=1000)
"""A right-skewed predicted length distribution (``expected_remaining`` ranks by its mean)."""
STEP_S = 0.01
"""The fake clock's step; the scheduler's ``service_s_per_token`` is set to it (one step per token)."""


def request(request_id: str, prompt_tokens: int, predicted: int, arrival_s: float) -> Request:
    new = NewRequest(
        request_id, tuple(range(1, prompt_tokens + 1)), SamplingParams(max_tokens=1000), predicted
    )
    return Request.of(new, arrival_s)


def test_every_order_has_a_queue() -> None:
    kinds = {order: type(waiting_queue(SchedulerConfig(queue_order=order))).__name__ for order in QueueOrder}
    assert kinds == {
        QueueOrder.FCFS: "FCFSQueue",
        QueueOrder.SSJF: "SSJFQueue",
        QueueOrder.SSJF_BOUNDED: "BoundedSSJFQueue",
        QueueOrder.HRRN: "HRRNQueue",
        QueueOrder.EXPECTED_REMAINING: "ExpectedRemainingQueue",
    }


def test_ssjf_ranks_by_predicted_work_prompt_included() -> None:
    """One definition of a request's predicted service: uncomputed prompt plus predicted output."""
    queue = SSJFQueue(aging_threshold_s=1e9)
    long_prompt = request("long-prompt", prompt_tokens=100, predicted=10, arrival_s=0.0)  # 110 tokens of work
    long_output = request("long-output", prompt_tokens=5, predicted=50, arrival_s=0.0)  # 55
    for r in (long_prompt, long_output):
        queue.add(r)
    assert [r.request_id for r in queue.ordered(1.0)] == ["long-output", "long-prompt"]
    long_prompt.num_computed_tokens = 100  # its prompt is in the cache: 10 tokens left
    assert [r.request_id for r in queue.ordered(1.0)] == ["long-prompt", "long-output"]


def test_wait_bound_is_the_floor_or_a_multiple_of_predicted_service() -> None:
    bound = WaitBound(s_per_token=0.02, floor_s=10.0, service_multiple=4.0)
    short = request("short", prompt_tokens=10, predicted=90, arrival_s=0.0)  # 100 tokens: 2 s of service
    long = request("long", prompt_tokens=100, predicted=400, arrival_s=0.0)  # 500 tokens: 10 s
    assert bound.service_s(short) == pytest.approx(2.0) and bound.max_wait_s(short) == 10.0
    assert bound.service_s(long) == pytest.approx(10.0) and bound.max_wait_s(long) == pytest.approx(40.0)


def test_bounded_ssjf_ages_a_job_at_half_its_own_bound() -> None:
    queue = BoundedSSJFQueue(WaitBound(s_per_token=0.02, floor_s=10.0, service_multiple=4.0))
    long = request("long", prompt_tokens=100, predicted=400, arrival_s=0.0)  # bound 40 s: ages at 20 s
    medium = request("medium", prompt_tokens=10, predicted=290, arrival_s=0.0)  # bound 24 s: ages at 12 s
    for r in (long, medium):
        queue.add(r)
    order = lambda now_s: [r.request_id for r in queue.ordered(now_s)]  # noqa: E731
    assert order(11.9) == ["medium", "long"]
    queue.add(request("short", prompt_tokens=1, predicted=9, arrival_s=19.0))  # bound 10 s: ages at 24 s
    assert order(19.9) == ["medium", "short", "long"]  # medium aged; then least work first
    assert order(20.0) == ["medium", "long", "short"]  # long aged too: earliest bound first, then the rest


def test_hrrn_serves_the_highest_response_ratio() -> None:
    queue = HRRNQueue(WaitBound(s_per_token=0.01, floor_s=1e9, service_multiple=0.0))
    long = request("long", prompt_tokens=1, predicted=999, arrival_s=0.0)  # 10 s of service
    short = request("short", prompt_tokens=1, predicted=99, arrival_s=4.0)  # 1 s of service
    for r in (long, short):
        queue.add(r)
    # At 4.5 s: long (4.5 + 10) / 10 = 1.45, short (0.5 + 1) / 1 = 1.5.
    assert [r.request_id for r in queue.ordered(4.5)] == ["short", "long"]
    # At 4.05 s: long 1.405, short 1.05: the long job has waited long enough relative to its size.
    assert [r.request_id for r in queue.ordered(4.05)] == ["long", "short"]


def first_wait_of_long_request(order: QueueOrder, seed: int = 0) -> tuple[float, float]:
    """A long request arrives behind a backlog of 200 short ones while more short ones keep arriving
    (Poisson) at 0.9x of what the replica's 4 slots serve. Returns (its wait for admission, its bound)."""
    num_slots, short_tokens, long_tokens = 4, 8, 300
    config = SchedulerConfig(
        queue_order=order,
        max_num_seqs=num_slots,
        chunk_size=64,
        service_s_per_token=STEP_S,
        aging_threshold_s=1e9,  # plain SSJF without its fixed aging: the starvation the bound prevents
    )
    scheduler = Scheduler(config, num_blocks=512, block_size=4, max_model_len=1024, eos_token_ids=())
    clock = [0.0]
    engine = Engine(FakeRunner(512, 4), scheduler, clock=lambda: clock[0])
    rate_per_s = 0.9 * num_slots / ((short_tokens + 1) * STEP_S)  # a short job holds a slot ~9 steps
    rng = random.Random(seed)
    arrivals, t = [0.0] * 200, 0.0
    while t < 60.0:
        t += rng.expovariate(rate_per_s)
        arrivals.append(t)
    short = SamplingParams(max_tokens=short_tokens, ignore_eos=True)
    long = NewRequest(
        "long",
        (1, 2, 3, 4),
        SamplingParams(max_tokens=long_tokens, ignore_eos=True),
        long_tokens,
        output_length_distribution=SPREAD,  # its mean is above its point: it ranks even later
    )
    engine.add_request(long, arrival_s=0.5)
    waiting_long = scheduler.requests["long"]
    bound_s = WaitBound.of(config).max_wait_s(waiting_long)  # at arrival: 4 prompt + 300 output tokens
    next_arrival = 0
    while clock[0] < 60.0:
        while next_arrival < len(arrivals) and arrivals[next_arrival] <= clock[0]:
            new = NewRequest(
                f"s{next_arrival}", (1, 2, 3, 4), short, short_tokens, output_length_distribution=SPREAD
            )
            engine.add_request(new, arrival_s=arrivals[next_arrival])
            next_arrival += 1
        if waiting_long.admitted_s is not None:
            break
        clock[0] += STEP_S
        engine.step()
    assert waiting_long.admitted_s is not None, f"{order.value}: the long request never started"
    return waiting_long.admitted_s - waiting_long.arrival_s, bound_s


def test_unbounded_ssjf_starves_the_long_request_past_the_bound() -> None:
    """The scenario has teeth: plain shortest-first (no aging) keeps the long request waiting past it."""
    wait_s, bound_s = first_wait_of_long_request(QueueOrder.SSJF)
    assert bound_s == pytest.approx(4 * 304 * STEP_S)  # 4 x (4 prompt + 300 output tokens) of service
    assert wait_s > bound_s


@pytest.mark.parametrize(
    "order", [QueueOrder.SSJF_BOUNDED, QueueOrder.HRRN, QueueOrder.EXPECTED_REMAINING], ids=lambda o: o.value
)
def test_long_request_behind_a_stream_of_short_ones_starts_within_the_bound(order: QueueOrder) -> None:
    wait_s, bound_s = first_wait_of_long_request(order)
    assert wait_s <= bound_s
