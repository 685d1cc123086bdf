"""The zero-cost runner of ``binserve bench path``: a real engine on it, and its config's checks."""

from __future__ import annotations

import time

import pytest

from bench.path_runner import PathRunner, PathRunnerConfig, path_token
from cluster.config import parse_section
from pipeline.config import SchedulerConfig
from pipeline.engine import Engine
from pipeline.request import FinishReason, SamplingParams
from pipeline.scheduler import Scheduler


def test_the_engine_on_the_path_runner_makes_its_deterministic_tokens_at_its_step_time() -> None:
    step_s = 0.01
    scheduler = Scheduler(SchedulerConfig(chunk_size=64, max_num_seqs=8), 64, 16, 512, eos_token_ids=(0,))
    engine = Engine(PathRunner(step_s, num_blocks=64, vocab_size=8192), scheduler)
    prompts = [(5, 6, 7), (1,) * 20]
    start_s = time.perf_counter()
    done = engine.generate(prompts, SamplingParams(max_tokens=10))
    elapsed_s = time.perf_counter() - start_s
    for prompt, completion in zip(prompts, done, strict=True):
        # The token sampled after position p is a function of p alone (never a special id below 1000).
        positions = range(len(prompt), len(prompt) + 10)
        assert completion.output_token_ids == tuple(path_token(p, 8192) for p in positions)
        assert completion.finish_reason is FinishReason.LENGTH
    assert elapsed_s >= 10 * step_s  # ten steps (both requests share each), none shorter than step_s
    assert scheduler.block_manager.num_free_blocks == 64


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"step_s": -0.001}, r"path_runner.step_s: must be in \[0.0, 10.0\], got -0.001"),
        ({"num_blocks": 0}, r"path_runner.num_blocks: must be in \[1, inf\], got 0"),
        ({"step": 1}, r"path_runner.step: unknown field; known fields: num_blocks, step_s"),
    ],
)
def test_a_bad_path_runner_section_names_the_field(section: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_section(PathRunnerConfig, section, "path_runner")


def test_the_path_runner_refuses_a_vocabulary_it_cannot_cycle_in() -> None:
    with pytest.raises(ValueError, match=r"vocab_size: must be > 1000 for the path runner, got 512"):
        PathRunner(0.0, 64, 512)


def test_the_serve_floor_pool_streams_every_token_once_and_coalesces_behind_a_slow_caller() -> None:
    import asyncio

    from bench.path_runner import FIRST_TOKEN_ID
    from bench.serve_floor import FloorPool

    pool = FloorPool.func_or_class(step_s=0.001)  # the class itself, without Serve

    async def stream(delay_s: float) -> list[tuple[int, ...]]:
        messages = []
        async for token_ids in pool.generate(40):
            messages.append(token_ids)
            await asyncio.sleep(delay_s)
        return messages

    async def both() -> list[list[tuple[int, ...]]]:
        return await asyncio.wait_for(asyncio.gather(stream(0.0), stream(0.02)), 30)

    try:
        fast, slow = asyncio.run(both())
    finally:
        pool.stopped = True
    for messages in (fast, slow):
        assert [t for m in messages for t in m] == list(range(FIRST_TOKEN_ID, FIRST_TOKEN_ID + 40))
    assert len(slow) < len(fast)  # tokens made while the caller slept come in one message
    assert not pool.requests
