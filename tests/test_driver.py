"""The engine driver: streaming to asyncio callers, aborts on cancellation, runner failure."""

from __future__ import annotations

import asyncio
import itertools
import threading

import pytest

from pipeline.config import SchedulerConfig
from pipeline.driver import EngineDeadError, EngineDriver, QueueFullError, StalledStreamError
from pipeline.engine import Engine
from pipeline.request import FinishReason, NewRequest, SamplingParams
from pipeline.scheduler import Scheduler
from tests.fake_runner import FakeRunner


def make_driver(runner=None, **kwargs) -> EngineDriver:
    runner = runner or FakeRunner(64, 4)
    scheduler = Scheduler(SchedulerConfig(chunk_size=16), 64, 4, 128, eos_token_ids=())
    driver = EngineDriver(Engine(runner, scheduler), **kwargs)
    driver.start()
    return driver


async def collect(driver: EngineDriver, request_id: str, max_tokens: int) -> list:
    return [
        o
        async for o in driver.generate(
            NewRequest(request_id, (1, 2, 3), SamplingParams(max_tokens=max_tokens))
        )
    ]


def num_tokens(outputs: list) -> int:
    """Tokens streamed: an output carries every token made since the caller took the previous one."""
    return sum(len(o.new_token_ids) for o in outputs)


def test_concurrent_streams_get_all_their_tokens() -> None:
    driver = make_driver()

    async def main():
        return await asyncio.gather(*(collect(driver, f"r{i}", 5 + i) for i in range(6)))

    results = asyncio.run(main())
    driver.stop()
    for i, outs in enumerate(results):
        assert num_tokens(outs) == 5 + i and outs[-1].finish_reason is not None
        assert [o.num_output_tokens for o in outs] == list(
            itertools.accumulate(len(o.new_token_ids) for o in outs)
        )
    assert driver.engine.scheduler.block_manager.num_free_blocks == 64


def test_bad_request_raises_value_error_and_others_continue() -> None:
    driver = make_driver()

    async def main():
        with pytest.raises(ValueError, match="prompt: must have at least 1 token"):
            async for _ in driver.generate(NewRequest("bad", (), SamplingParams())):
                pass
        with pytest.raises(ValueError, match="prompt_token_ids: ids must be in"):
            async for _ in driver.generate(NewRequest("bad", (5000,), SamplingParams())):
                pass
        return await collect(driver, "good", 4)

    assert num_tokens(asyncio.run(main())) == 4
    driver.stop()


def test_cancelled_stream_aborts_and_frees_blocks() -> None:
    driver = make_driver()

    async def main():
        stream = driver.generate(NewRequest("long", (1, 2, 3), SamplingParams(max_tokens=100)))
        await stream.__anext__()
        await stream.aclose()  # what a cancelled gRPC call does
        for _ in range(100):
            if not driver.engine.has_unfinished:
                return
            await asyncio.sleep(0.01)

    asyncio.run(main())
    driver.stop()
    assert not driver.engine.has_unfinished
    assert driver.engine.scheduler.block_manager.num_free_blocks == 64


class _Gated(FakeRunner):
    """Holds every step until the test opens the gate."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.gate = threading.Event()

    def execute(self, plan):
        self.gate.wait(timeout=10)
        return super().execute(plan)


def test_queue_full_is_refused() -> None:
    runner = _Gated(64, 4)
    driver = make_driver(runner=runner, max_queued_requests=1)

    async def main():
        first = asyncio.create_task(collect(driver, "a", 3))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFullError, match="queue is full"):
            await collect(driver, "b", 1)
        runner.gate.set()
        return await first

    assert num_tokens(asyncio.run(main())) == 3
    driver.stop()


class _Dying(FakeRunner):
    def execute(self, plan):
        if len(self.plans) >= 3:
            raise RuntimeError("stage actor died")
        return super().execute(plan)


def test_runner_failure_fails_requests_and_marks_unhealthy() -> None:
    driver = make_driver(runner=_Dying(64, 4))

    async def main():
        with pytest.raises(EngineDeadError, match="stage actor died"):
            await collect(driver, "a", 50)
        with pytest.raises(EngineDeadError):
            await collect(driver, "b", 1)

    asyncio.run(main())
    assert not driver.is_healthy
    driver.stop()


def test_a_caller_that_falls_behind_gets_every_token_in_fewer_larger_outputs() -> None:
    [offline] = Engine(
        FakeRunner(64, 4), Scheduler(SchedulerConfig(chunk_size=16), 64, 4, 128, eos_token_ids=())
    ).generate([(1, 2, 3)], SamplingParams(max_tokens=60))
    driver = make_driver()

    async def main():
        outputs = []
        async for out in driver.generate(NewRequest("slow", (1, 2, 3), SamplingParams(max_tokens=60))):
            outputs.append(out)
            await asyncio.sleep(0.02)  # the fake runner makes several tokens meanwhile
        return outputs

    outputs = asyncio.run(main())
    driver.stop()
    assert tuple(t for o in outputs for t in o.new_token_ids) == offline.output_token_ids
    assert len(outputs) < 60 and max(len(o.new_token_ids) for o in outputs) > 1
    assert [o.finish_reason for o in outputs] == [None] * (len(outputs) - 1) + [FinishReason.LENGTH]
    assert outputs[-1].num_output_tokens == 60 and outputs[-1].metrics.num_output_tokens == 60


def test_a_caller_that_stops_reading_is_aborted_and_its_blocks_freed() -> None:
    driver = make_driver(max_buffered_tokens=8)

    async def main():
        stream = driver.generate(NewRequest("stalled", (1, 2, 3), SamplingParams(max_tokens=100)))
        await stream.__anext__()
        for _ in range(200):  # stop reading until the driver gives up on the caller
            if not driver.engine.has_unfinished:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(StalledStreamError, match=r"max_buffered_tokens 8\); aborted"):
            async for _ in stream:
                pass

    asyncio.run(main())
    driver.stop()
    assert not driver.engine.has_unfinished
    assert driver.engine.scheduler.block_manager.num_free_blocks == 64
