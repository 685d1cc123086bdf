"""The pipeline-parallel replica: stage partitioning, token parity with one process, stage failure."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import ray
import torch

from pipeline.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    StagePlacement,
)
from pipeline.driver import EngineDeadError, EngineDriver
from pipeline.request import FinishReason, NewRequest, SamplingParams
from workers.checkpoint import load_config
from workers.llm import LLM, build_engine
from workers.partition import kv_block_bytes, split_layers, stage_layer_ranges
from workers.pipeline_runner import PipelineRunner, pipeline_bundles
from workers.stage_worker import MicroBatchResult, StageWorker

PROMPTS = [
    "Hello",
    "What is the capital of France? Please answer briefly.",
    "Write a poem about the sea, the sky and all the things in between them. " * 3,
    "a b c d e f g",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "x",
    "How do I sort a list of dictionaries by a key in Python?",
]
MAX_TOKENS = 16
KV_CACHE_BYTES = 8 * 2**20


def engine_config(model_dir: str, policy: str = "sarathi", pp_size: int = 1) -> EngineConfig:
    # A small chunk so SARATHI splits the longer prompts over several micro-batches.
    return EngineConfig(
        ModelConfig(model_dir),
        cache=CacheConfig(kv_cache_bytes=KV_CACHE_BYTES),
        scheduler=SchedulerConfig(policy=policy, chunk_size=32),
        parallel=ParallelConfig(pp_size=pp_size),
    )


# ---- partitioning (pure) ------------------------------------------------------------------------


def test_split_minimises_the_largest_stage_and_weighs_the_head() -> None:
    assert split_layers([1.0] * 4, 0.0, 2) == [(0, 2), (2, 4)]
    assert split_layers([1.0] * 4, 2.0, 2) == [(0, 3), (3, 4)]  # the head is worth two layers
    assert split_layers([1.0] * 6, 0.0, 3) == [(0, 2), (2, 4), (4, 6)]
    assert split_layers([1.0] * 3, 0.0, 3) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match=r"pp_size: must be in \[1, 4\]"):
        split_layers([1.0] * 4, 0.0, 5)


def test_ranges_count_flops_so_the_embedding_costs_nothing(tiny_llama: str) -> None:
    hf_config = load_config(tiny_llama)
    # Prefill-heavy micro-batches: lm_head sees few rows, so layers split evenly although the first
    # stage also holds the embedding (8192 x 128 parameters, more than five layers' worth).
    assert stage_layer_ranges(hf_config, 2, tokens_per_step=512, sampled_rows_per_step=1) == [(0, 2), (2, 4)]
    # Decode-only micro-batches: every row goes through lm_head, which outweighs layers here.
    assert stage_layer_ranges(hf_config, 2, tokens_per_step=64, sampled_rows_per_step=64) == [(0, 3), (3, 4)]


def test_bundles_are_one_gpu_or_the_stage_threads_per_stage() -> None:
    assert pipeline_bundles(ParallelConfig(pp_size=3), use_gpu=True) == [{"GPU": 1.0}] * 3
    assert pipeline_bundles(ParallelConfig(pp_size=2, torch_threads=2), use_gpu=False) == [{"CPU": 2.0}] * 2


def test_stage_placement_is_the_replicas_placement_group_strategy(tiny_llama: str) -> None:
    from cluster.engine_pool import replica_placement

    model = ModelConfig(tiny_llama, device="cpu")
    for placement, strategy in (("pack", "PACK"), ("spread", "SPREAD")):
        config = EngineConfig(model, parallel=ParallelConfig(pp_size=2, stage_placement=placement))
        assert replica_placement(config, num_cpus=0.5, num_gpus=0.0)["placement_group_strategy"] == strategy
    assert ParallelConfig().stage_placement is StagePlacement.PACK
    with pytest.raises(ValueError, match="stage_placement: must be one of pack, spread, got 'strict'"):
        ParallelConfig(stage_placement="strict")


def test_a_separate_model_process_is_one_stage_bundle_beside_the_replicas(tiny_llama: str) -> None:
    from cluster.engine_pool import replica_placement

    model = ModelConfig(tiny_llama, device="cpu")
    inline = EngineConfig(model, parallel=ParallelConfig(torch_threads=2))
    assert replica_placement(inline, num_cpus=2.0, num_gpus=0.0) == {
        "ray_actor_options": {"num_cpus": 2.0, "num_gpus": 0.0}
    }
    apart = EngineConfig(model, parallel=ParallelConfig(torch_threads=2, separate_model_process=True))
    assert apart.parallel.uses_stage_actors and not inline.parallel.uses_stage_actors
    placement = replica_placement(apart, num_cpus=0.5, num_gpus=0.0)
    assert placement["ray_actor_options"] == {"num_cpus": 0.5}
    assert placement["placement_group_bundles"] == [{"CPU": 0.5}, {"CPU": 2.0}]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: the last stage's lm_head is the tied embedding
def test_stages_in_one_process_match_the_whole_model(tiny_model_factory, arch: str) -> None:
    model_dir = tiny_model_factory(arch)
    config = engine_config(model_dir)
    whole = LLM(config)
    cache = CacheConfig(num_blocks=whole.runner.num_blocks)
    stages = [StageWorker(config.model, (0, 1)), StageWorker(config.model, (1, 4))]
    for stage in stages:
        stage.load(cache)
    engine = build_engine(config, whole.runner)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(NewRequest(f"p{i}", whole.encode(prompt), SamplingParams(max_tokens=4)))
    while engine.has_unfinished:
        plan = engine.schedule()
        whole.runner.submit(plan)
        expected = whole.runner.collect()
        result = stages[1].forward(plan, stages[0].forward(plan))
        assert isinstance(result, MicroBatchResult) and len(result.stage_busy_s) == 2
        assert result.output == expected
        engine.complete(plan, expected)


# ---- the pipeline of actors ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    # Four logical CPUs: the shared pipeline's two stages plus a second pipeline for the failure test.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pipeline(ray_cluster, tiny_llama: str):
    runner = PipelineRunner.create(engine_config(tiny_llama, pp_size=2))
    yield runner
    runner.shutdown()


def test_every_stage_holds_the_smallest_stage_capacity(pipeline: PipelineRunner, tiny_llama: str) -> None:
    hf_config = load_config(tiny_llama)
    [(_, a), (b, c)] = pipeline.layer_ranges
    assert (0, c) == (0, hf_config.num_hidden_layers) and a == b
    most_layers = max(end - start for start, end in pipeline.layer_ranges)
    block_bytes = kv_block_bytes(hf_config, most_layers, 16, torch.float32)
    assert pipeline.num_blocks == KV_CACHE_BYTES // block_bytes


@pytest.mark.parametrize("policy", ["sarathi", "prefill_first"])
def test_two_stages_give_the_greedy_tokens_of_one(
    pipeline: PipelineRunner, tiny_llama: str, policy: str
) -> None:
    params = SamplingParams(max_tokens=MAX_TOKENS)
    expected = LLM(engine_config(tiny_llama, policy)).generate(PROMPTS, params)
    llm = LLM(engine_config(tiny_llama, policy, pp_size=2), runner=pipeline)
    pipeline.reset_stats()
    done = llm.generate(PROMPTS, params)
    assert [d.completion.output_token_ids for d in done] == [e.completion.output_token_ids for e in expected]
    assert llm.engine.scheduler.block_manager.num_free_blocks == pipeline.num_blocks
    stats = pipeline.stats()
    assert stats.num_stages == 2 and stats.num_micro_batches > len(PROMPTS)
    assert all(busy > 0 for busy in stats.stage_busy_s) and 0.0 <= stats.bubble_fraction < 1.0
    if policy == "sarathi":
        assert stats.max_in_flight == 2  # the micro-batches really overlapped


def test_killed_stage_fails_its_requests_and_the_replica_turns_unhealthy(
    ray_cluster, tiny_llama: str
) -> None:
    config = engine_config(tiny_llama, pp_size=2)
    runner = PipelineRunner.create(config)
    driver = EngineDriver(build_engine(config, runner))
    driver.start()
    long = SamplingParams(max_tokens=2000, ignore_eos=True)

    async def stream(request_id: str, started: asyncio.Event) -> list:
        outputs = []
        async for out in driver.generate(NewRequest(request_id, tuple(range(1, 40)), long)):
            outputs.append(out)
            started.set()
        return outputs

    async def main() -> tuple[list, float]:
        started = [asyncio.Event() for _ in range(4)]
        tasks = [asyncio.create_task(stream(f"r{i}", e)) for i, e in enumerate(started)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), timeout=30)
        ray.kill(runner.stages[1])
        killed_s = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=30)
        return results, time.monotonic() - killed_s

    try:
        results, waited_s = asyncio.run(main())
        assert waited_s < 10.0
        for result in results:
            assert isinstance(result, EngineDeadError), result
            assert "stage 1 (layers [" in str(result) and "died" in str(result)
        assert not driver.is_healthy

        async def after() -> None:
            async for _ in driver.generate(NewRequest("late", (1, 2, 3), SamplingParams())):
                pass

        with pytest.raises(EngineDeadError, match="engine is unhealthy"):
            asyncio.run(after())
    finally:
        driver.stop()
        runner.shutdown()


def test_a_separate_model_process_gives_the_greedy_tokens_of_the_model_in_process(
    ray_cluster, tiny_llama: str
) -> None:
    params = SamplingParams(max_tokens=MAX_TOKENS)
    expected = LLM(engine_config(tiny_llama)).generate(PROMPTS, params)
    config = engine_config(tiny_llama)
    config = EngineConfig(
        config.model, config.cache, config.scheduler, ParallelConfig(separate_model_process=True)
    )
    llm = LLM(config)
    try:
        assert isinstance(llm.runner, PipelineRunner) and llm.runner.depth == 1
        assert os.getpid() not in llm.runner.stage_pids
        done = llm.generate(PROMPTS, params)
        assert [d.completion.output_token_ids for d in done] == [
            e.completion.output_token_ids for e in expected
        ]
        assert llm.engine.scheduler.block_manager.num_free_blocks == llm.runner.num_blocks
    finally:
        llm.shutdown()


def test_pipeline_runner_also_runs_one_plan_at_a_time(pipeline: PipelineRunner, tiny_llama: str) -> None:
    llm = LLM(engine_config(tiny_llama, pp_size=2), runner=pipeline)
    llm.engine.add_request(
        NewRequest("one", llm.encode("Hello there"), SamplingParams(max_tokens=3, ignore_eos=True))
    )
    outputs = []
    while llm.engine.has_unfinished:
        outputs += llm.engine.step()
    assert [o.finish_reason for o in outputs] == [None, None, FinishReason.LENGTH]


def test_two_long_prompts_finish_on_two_stages_under_kv_pressure(ray_cluster, tiny_llama: str) -> None:
    """The reproduction on the real engine: 128 blocks of 16 tokens, two ~1,500-token prompts, chunk 512,
    pp 2. Admission used to reserve only the first chunk: both prefills stalled at 1,024 tokens, forever."""
    config = EngineConfig(
        ModelConfig(tiny_llama, max_model_len=2048),
        cache=CacheConfig(num_blocks=128),
        scheduler=SchedulerConfig(chunk_size=512),
        parallel=ParallelConfig(pp_size=2),
    )
    llm = LLM(config)
    try:
        prompts = [tuple((17 * i + j) % 8000 + 1 for j in range(1500)) for i in range(2)]
        done = llm.engine.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
        assert [len(c.output_token_ids) for c in done] == [8, 8]
        assert llm.engine.scheduler.block_manager.num_free_blocks == 128
    finally:
        llm.shutdown()
