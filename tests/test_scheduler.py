"""Scheduler behaviour with a fake runner: budgets, batch composition, queue order, bins, aborts."""

from __future__ import annotations

import random

import pytest

from pipeline.config import SchedulerConfig
from pipeline.engine import Engine
from pipeline.plan import StepPlan
from pipeline.request import FinishReason, NewRequest, SamplingParams
from pipeline.scheduler import Scheduler
from tests.fake_runner import Clock, FakeRunner, next_token

EOS = 999



def make_engine(
    num_blocks: int = 256, block_size: int = 4, max_model_len: int = 256, **scheduler: object
) -> tuple[Engine, FakeRunner, Clock]:
    runner = FakeRunner(num_blocks, block_size)
    clock = Clock()
    sched = Scheduler(
        SchedulerConfig(**scheduler), num_blocks, block_size, max_model_len, eos_token_ids=(EOS,)
    )
    return Engine(runner, sched, clock=clock), runner, clock


def run_to_end(engine: Engine, clock: Clock, max_steps: int = 10_000) -> list[str]:
    """Step until idle; return request ids in the order of their first output token."""
    first_token_order: list[str] = []
    for _ in range(max_steps):
        if not engine.has_unfinished:
            return first_token_order
        clock.now_s += 0.01
        for out in engine.step():
            if out.num_output_tokens == 1:
                first_token_order.append(out.request_id)
    raise AssertionError("engine did not finish")


def expected_tokens(prompt: list[int], max_tokens: int, ignore_eos: bool = False) -> list[int]:
    tokens = list(prompt)
    out = []
    for _ in range(max_tokens):
        t = next_token(tokens, 1000)
        out.append(t)
        tokens.append(t)
        if t == EOS and not ignore_eos:
            break
    return out


def random_prompts(n: int, seed: int = 0, max_len: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(900) for _ in range(rng.randint(1, max_len))] for _ in range(n)]


def check_block_tables_disjoint(engine: Engine) -> None:
    owned = [b for r in engine.scheduler.running for b in r.block_ids]
    assert len(owned) == len(set(owned))
    assert (
        len(owned) + engine.scheduler.block_manager.num_free_blocks
        == engine.scheduler.block_manager.num_blocks
    )


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64])
def test_sarathi_budget_and_decode_maximal_composition(chunk_size: int) -> None:
    engine, runner, clock = make_engine(chunk_size=chunk_size, max_num_seqs=8)
    prompts = random_prompts(20)
    for i, p in enumerate(prompts):
        engine.add_request(NewRequest(f"r{i}", p, SamplingParams(max_tokens=12)))
    while engine.has_unfinished:
        clock.now_s += 0.01
        decodable = {r.request_id for r in engine.scheduler.running if r.is_decoding}
        plan = engine.schedule()
        engine.complete(plan, runner.execute(plan))
        check_block_tables_disjoint(engine)
        assert plan.num_tokens <= chunk_size
        assert len([c for c in plan.chunks if c.request_id not in decodable]) <= 1  # one prefill chunk
        # Stall-free: every running decode is in the step (as long as the budget allows).
        scheduled = {c.request_id for c in plan.chunks}
        assert decodable <= scheduled or plan.num_tokens == chunk_size
    assert engine.scheduler.block_manager.num_free_blocks == 256


def test_outputs_match_fake_model_across_policies() -> None:
    prompts = random_prompts(12, seed=1)
    for policy, chunk in [
        ("sarathi", 5),
        ("sarathi", 512),
        ("prefill_first", 32),
        ("static", 32),
        ("dynamic", 32),
    ]:
        engine, _, clock = make_engine(
            policy=policy, chunk_size=chunk, max_num_seqs=4, batch_wait_timeout_s=0.0
        )
        done = engine.generate(prompts, SamplingParams(max_tokens=9))
        for prompt, c in zip(prompts, done, strict=True):
            assert list(c.output_token_ids) == expected_tokens(prompt, 9), policy
        assert engine.scheduler.block_manager.num_free_blocks == 256


def test_chunked_prefill_samples_only_on_last_chunk() -> None:
    engine, runner, clock = make_engine(chunk_size=16)
    engine.add_request(NewRequest("a", list(range(40)), SamplingParams(max_tokens=2)))
    run_to_end(engine, clock)
    chunks = [c for plan in runner.plans for c in plan.chunks]
    assert [(c.start_pos, c.num_tokens, c.sampling is not None) for c in chunks] == [
        (0, 16, False),
        (16, 16, False),
        (32, 8, True),
        (40, 1, True),
    ]


def test_prefill_first_runs_whole_prompts_without_decodes() -> None:
    engine, runner, clock = make_engine(policy="prefill_first", chunk_size=8, max_num_seqs=8)
    engine.add_request(NewRequest("a", list(range(30)), SamplingParams(max_tokens=5)))
    clock.now_s += 0.01
    engine.step()
    engine.add_request(NewRequest("b", list(range(20)), SamplingParams(max_tokens=5)))
    run_to_end(engine, clock)
    first, second = runner.plans[0], runner.plans[1]
    assert [(c.request_id, c.num_tokens) for c in first.chunks] == [("a", 30)]
    assert [(c.request_id, c.num_tokens) for c in second.chunks] == [("b", 20)]  # a's decode waits
    for plan in runner.plans:
        assert plan.num_prefill_tokens == 0 or plan.num_decode_tokens == 0


def test_fcfs_serves_in_arrival_order() -> None:
    engine, _, clock = make_engine(max_num_seqs=1, queue_order="fcfs")
    for i, pred in enumerate([50, 10, 30]):
        engine.add_request(
            NewRequest(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=3), predicted_output_tokens=pred),
            arrival_s=i,
        )
    assert run_to_end(engine, clock) == ["r0", "r1", "r2"]


def test_ssjf_serves_shortest_predicted_first() -> None:
    engine, _, clock = make_engine(max_num_seqs=1, queue_order="ssjf", aging_threshold_s=1e9)
    for i, pred in enumerate([50, 10, 30, 10]):
        engine.add_request(
            NewRequest(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=3), predicted_output_tokens=pred),
            arrival_s=0,
        )
    assert run_to_end(engine, clock) == ["r1", "r3", "r2", "r0"]


def test_ssjf_aging_guard_serves_starved_request_first() -> None:
    engine, _, clock = make_engine(max_num_seqs=1, queue_order="ssjf", aging_threshold_s=1.0)
    clock.now_s = 5.0
    engine.add_request(
        NewRequest("long-old", [1, 2], SamplingParams(max_tokens=3), predicted_output_tokens=500),
        arrival_s=0.0,
    )
    engine.add_request(
        NewRequest("short-new", [1, 2], SamplingParams(max_tokens=3), predicted_output_tokens=1),
        arrival_s=4.5,
    )
    engine.add_request(
        NewRequest("short-old", [1, 2], SamplingParams(max_tokens=3), predicted_output_tokens=2),
        arrival_s=3.0,
    )
    # long-old (waited 5 s) and short-old (2 s) are past the 1 s threshold: oldest first, then SSJF.
    assert run_to_end(engine, clock) == ["long-old", "short-old", "short-new"]


def test_static_batches_are_drawn_from_one_bin_and_run_to_completion() -> None:
    engine, _, clock = make_engine(policy="static", max_num_seqs=3, group_by_bin=True)
    bins = [0, 1, 0, 1, 0, 0, 1]
    requests = [
        engine.add_request(
            NewRequest(f"r{i}", [i + 1] * 5, SamplingParams(max_tokens=2 + i, ignore_eos=True), bin_id=b),
            arrival_s=i,
        )
        for i, b in enumerate(bins)
    ]
    run_to_end(engine, clock)
    batches: dict[float, list] = {}
    for r in requests:
        batches.setdefault(r.admitted_s, []).append(r)
    assert [[r.request_id for r in b] for b in batches.values()] == [
        ["r0", "r2", "r4"],
        ["r1", "r3", "r6"],
        ["r5"],
    ]
    ordered = sorted(batches.items())
    for (_, batch), (next_admitted_s, _) in zip(ordered, ordered[1:], strict=False):
        assert len({r.bin_id for r in batch}) == 1
        assert next_admitted_s > max(r.finished_s for r in batch)  # nobody joins a running batch


def test_dynamic_batching_waits_for_full_batch_or_timeout() -> None:
    engine, runner, clock = make_engine(policy="dynamic", max_num_seqs=3, batch_wait_timeout_s=1.0)
    engine.add_request(NewRequest("a", [1, 2], SamplingParams(max_tokens=2)), arrival_s=0.0)
    clock.now_s = 0.5
    assert engine.schedule().is_empty  # one request, not timed out yet
    engine.add_request(NewRequest("b", [1, 2], SamplingParams(max_tokens=2)), arrival_s=0.5)
    engine.add_request(NewRequest("c", [1, 2], SamplingParams(max_tokens=2)), arrival_s=0.5)
    plan = engine.schedule()  # full batch: starts at once
    assert {c.request_id for c in plan.chunks} == {"a", "b", "c"}
    engine.complete(plan, runner.execute(plan))
    run_to_end(engine, clock)
    engine.add_request(NewRequest("d", [1, 2], SamplingParams(max_tokens=2)), arrival_s=clock.now_s)
    assert engine.schedule().is_empty
    clock.now_s += 1.0
    assert [c.request_id for c in engine.schedule().chunks] == ["d"]


def test_aborts_free_every_block_in_every_state() -> None:
    engine, runner, clock = make_engine(chunk_size=8, max_num_seqs=2)
    for i in range(4):
        engine.add_request(NewRequest(f"r{i}", list(range(1, 20)), SamplingParams(max_tokens=50)))
    clock.now_s += 0.01
    engine.step()
    in_flight_plan = engine.schedule()  # r0's second chunk is planned but its output not back yet
    assert any(r.is_in_flight for r in engine.scheduler.running)
    assert engine.abort("r0")  # in flight
    assert engine.abort("r3")  # waiting
    assert not engine.abort("r3")  # already gone
    outs = engine.complete(in_flight_plan, runner.execute(in_flight_plan))
    assert all(o.request_id != "r0" for o in outs)
    clock.now_s += 0.01
    engine.step()
    assert engine.abort("r1") and engine.abort("r2")  # running
    assert not engine.has_unfinished
    assert engine.scheduler.block_manager.num_free_blocks == 256
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_preemption_recomputes_and_returns_every_block() -> None:
    # 12 blocks of 4 tokens: far too few for 8 requests of ~30 tokens each at once.
    engine, runner, clock = make_engine(
        num_blocks=12, block_size=4, max_model_len=48, chunk_size=16, max_num_seqs=8
    )
    prompts = random_prompts(8, seed=3, max_len=20)
    done = engine.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True))
    for prompt, c in zip(prompts, done, strict=True):
        assert list(c.output_token_ids) == expected_tokens(prompt, 20, ignore_eos=True)
    assert sum(c.metrics.num_preemptions for c in done) > 0
    assert engine.scheduler.block_manager.num_free_blocks == 12


def test_stop_conditions() -> None:
    engine, _, _ = make_engine(max_model_len=12)
    prompt = [5, 6, 7]
    ref = expected_tokens(prompt, 8)
    stop_at = ref[2]
    [stopped] = engine.generate([prompt], SamplingParams(max_tokens=8, stop_token_ids=(stop_at,)))
    assert list(stopped.output_token_ids) == ref[: ref.index(stop_at) + 1]
    assert stopped.finish_reason is FinishReason.STOP
    [capped] = engine.generate([list(range(10))], SamplingParams(max_tokens=8))
    assert capped.finish_reason is FinishReason.LENGTH and len(capped.output_token_ids) == 2  # context full


def test_request_timestamps_are_recorded() -> None:
    engine, _, clock = make_engine()
    engine.add_request(
        NewRequest("a", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True)), arrival_s=0.0
    )
    metrics = None
    while engine.has_unfinished:
        clock.now_s += 0.5
        for out in engine.step():
            metrics = out.metrics or metrics
    assert metrics is not None
    assert metrics.ttft_s == 0.5 and metrics.token_times_s == (0.5, 1.0, 1.5, 2.0)
    assert metrics.tbt_s == (0.5, 0.5, 0.5) and metrics.completion_s == 2.0 and metrics.queueing_s == 0.5


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(prompt_token_ids=[]), "prompt"),
        (dict(prompt_token_ids=list(range(256))), "prompt"),
        (dict(prompt_token_ids=[5000]), "prompt_token_ids"),
        (dict(request_id="busy"), "request_id"),
        (dict(predicted_output_tokens=-1), "predicted_output_tokens"),
    ],
)
def test_bad_requests_are_refused_and_others_keep_running(kwargs: dict, field: str) -> None:
    engine, _, clock = make_engine()
    engine.add_request(NewRequest("busy", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True)))
    args = dict(request_id="bad", prompt_token_ids=[1], params=SamplingParams())
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        engine.add_request(NewRequest(**args))
    run_to_end(engine, clock)
    assert engine.scheduler.block_manager.num_free_blocks == 256


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"{field}: must be in"):
        SamplingParams(**kwargs)


def test_plan_is_frozen() -> None:
    plan = StepPlan(0, ())
    with pytest.raises(AttributeError):
        plan.step_id = 1  # type: ignore[misc]


def test_refined_predictions_choose_the_preemption_victim() -> None:
    """Three requests fill a 6-block pool; the oldest's growth must preempt one of the two newer ones: the
    one with the longest predicted remaining output, by the prompt-only prediction or, once the probe has
    run, by the refined one."""

    def first_preempted(probe) -> str:
        runner = FakeRunner(6, 4, probe=probe)
        clock = Clock()
        config = SchedulerConfig(chunk_size=64, max_prefill_chunks=3, watermark_fraction=0.0)
        scheduler = Scheduler(config, 6, 4, 64, (EOS,))
        engine = Engine(runner, scheduler, clock=clock)
        for name, predicted in (("old", 50), ("short", 10), ("long", 100)):
            params = SamplingParams(max_tokens=8, ignore_eos=True)
            engine.add_request(
                NewRequest(name, (1, 2, 3, 4, 5, 6, 7), params, predicted), arrival_s=clock.now_s
            )
            clock.now_s += 0.01
        while engine.has_unfinished:
            engine.step()
            preempted = [p for plan in runner.plans for p in plan.preempted_ids]
            if preempted:
                return preempted[0]
        raise AssertionError("nothing was preempted")

    assert first_preempted(probe=None) == "long"
    # The probe says "short" will in fact run for 500 tokens: it becomes the victim.
    assert first_preempted(probe=lambda chunk: 500 if chunk.request_id == "short" else None) == "short"


def test_ssjf_orders_by_refined_remaining_output() -> None:
    from pipeline.policies import SSJFQueue
    from pipeline.request import Request

    queue = SSJFQueue(aging_threshold_s=1e9)
    a = Request.of(NewRequest("a", (1,), SamplingParams(max_tokens=100), predicted_output_tokens=10), 0.0)
    b = Request.of(NewRequest("b", (1,), SamplingParams(max_tokens=100), predicted_output_tokens=40), 0.0)
    for request in (a, b):
        queue.add(request)
    assert [r.request_id for r in queue.ordered(1.0)] == ["a", "b"]
    a.refined_output_tokens = 80  # decoding showed "a" to be long: 80 - 0 remaining
    b.token_ids += [5] * 30  # "b" has produced 30 of its predicted 40: 10 remaining
    assert [r.request_id for r in queue.ordered(1.0)] == ["b", "a"]


def test_admission_by_predicted_length_avoids_preemption_and_never_reserves_beyond_the_pool() -> None:
    def run(reserve: bool, predicted: int) -> int:
        engine, _, clock = make_engine(
            num_blocks=16,
            block_size=4,
            chunk_size=64,
            reserve_predicted_output=reserve,
            watermark_fraction=0.0,
        )
        for i in range(2):
            params = SamplingParams(max_tokens=24, ignore_eos=True)
            engine.add_request(NewRequest(f"r{i}", tuple(range(1, 17)), params, predicted), arrival_s=0.0)
        run_to_end(engine, clock)
        assert engine.scheduler.block_manager.num_free_blocks == 16
        return engine.scheduler.num_preemptions

    # Two 16-token prompts growing to 40 tokens each need 20 blocks of 16: today's admission (the prompt
    # alone) admits both and preempts; reserving the predicted output admits the second only later.
    assert run(reserve=False, predicted=24) > 0
    assert run(reserve=True, predicted=24) == 0
    # A prediction far beyond the pool still lets a request in (its reservation is capped at the pool).
    assert run(reserve=True, predicted=10**6) == 0
