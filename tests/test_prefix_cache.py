"""Prefix caching on the real engine (tiny checkpoint): greedy tokens with caching on equal those with it
off, in one process and on a pipeline of two stages, with whole and chunked prefills, with and without
preemption; conversations hit the cache and report it in their usage; penalties and the length probe see
the same history."""

from __future__ import annotations

import pytest
import ray

from pipeline.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from pipeline.engine import Completion, Engine
from pipeline.request import SamplingParams
from workers.llm import LLM
from workers.pipeline_runner import PipelineRunner

SYSTEM = "You are a helpful assistant. Answer every question briefly and politely, in plain English. " * 2
QUESTIONS = [
    "What is the capital of France?",
    "How do I sort a list of dictionaries by a key in Python?",
    "List three colours.",
    "What is the capital of France?",  # the same prompt twice
    "Write a poem about the sea.",
]
FOLLOW_UP = " Thank you. Can you say more?"
MAX_TOKENS = 12
MAX_MODEL_LEN = 256
PREEMPTING_BLOCKS = 16  # 256 tokens: a whole sequence fits, five conversations at once do not


def engine_config(model_dir: str, chunk_size: int, num_blocks: int | None, caching: bool, pp_size: int = 1):
    return EngineConfig(
        ModelConfig(model_dir, max_model_len=MAX_MODEL_LEN),
        cache=CacheConfig(num_blocks=num_blocks, kv_cache_bytes=8 * 2**20, enable_prefix_caching=caching),
        scheduler=SchedulerConfig(chunk_size=chunk_size),
        parallel=ParallelConfig(pp_size=pp_size),
    )


def converse(llm: LLM, params: SamplingParams) -> tuple[list[Completion], list[Completion]]:
    """Two turns: each question after the system prompt, then each conversation so far plus a follow-up
    (the model's own answer resent as prompt tokens, as a chat client does), on one engine."""
    engine: Engine = llm.engine
    first = engine.generate([llm.encode(SYSTEM + q) for q in QUESTIONS], params)
    follow_up = llm.encode(FOLLOW_UP)
    second = engine.generate([[*c.prompt_token_ids, *c.output_token_ids, *follow_up] for c in first], params)
    return first, second


def outputs(turns: tuple[list[Completion], list[Completion]]) -> list[list[tuple[int, ...]]]:
    return [[c.output_token_ids for c in turn] for turn in turns]


@pytest.fixture(scope="module")
def ray_cluster():
    # address="local": a cluster of our own, not one another process on this machine started.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("num_blocks", [None, PREEMPTING_BLOCKS], ids=["ample", "preempting"])
@pytest.mark.parametrize("chunk_size", [16, 4096])
def test_caching_gives_the_same_greedy_tokens_in_one_process(
    tiny_llama: str, chunk_size: int, num_blocks: int | None
) -> None:
    params = SamplingParams(max_tokens=MAX_TOKENS)
    expected = outputs(
        converse(LLM(engine_config(tiny_llama, chunk_size, num_blocks, caching=False)), params)
    )
    llm = LLM(engine_config(tiny_llama, chunk_size, num_blocks, caching=True))
    first, second = converse(llm, params)
    assert outputs((first, second)) == expected
    scheduler = llm.engine.scheduler
    assert scheduler.block_manager.num_free_blocks == llm.runner.num_blocks
    if num_blocks is not None:
        assert scheduler.num_preemptions > 0
    else:  # every follow-up finds at least the first turn's whole blocks
        for before, after in zip(first, second, strict=True):
            assert after.metrics.num_cached_tokens >= len(before.prompt_token_ids) // 16 * 16 > 0
    assert scheduler.block_manager.num_hit_tokens > 0


@pytest.fixture(scope="module")
def pipeline(ray_cluster, tiny_llama: str):
    """Two stages with the preempting pool, shared by the tests (a pipeline takes long to build here)."""
    runner = PipelineRunner.create(engine_config(tiny_llama, 16, PREEMPTING_BLOCKS, True, pp_size=2))
    yield runner
    runner.shutdown()


@pytest.mark.parametrize("chunk_size", [16, 4096])
def test_caching_gives_the_same_greedy_tokens_on_two_stages_with_preemption(
    pipeline: PipelineRunner, tiny_llama: str, chunk_size: int
) -> None:
    params = SamplingParams(max_tokens=MAX_TOKENS)
    config = engine_config(tiny_llama, chunk_size, PREEMPTING_BLOCKS, caching=False)
    expected = outputs(converse(LLM(config), params))
    config = engine_config(tiny_llama, chunk_size, PREEMPTING_BLOCKS, caching=True, pp_size=2)
    llm = LLM(config, runner=pipeline)
    assert outputs(converse(llm, params)) == expected
    scheduler = llm.engine.scheduler
    assert scheduler.block_manager.num_free_blocks == pipeline.num_blocks == PREEMPTING_BLOCKS
    assert scheduler.num_preemptions > 0 and scheduler.block_manager.num_hit_tokens > 0


def test_penalties_see_the_cached_prefix(tiny_llama: str) -> None:
    """Penalties read the whole history; a cached prefix is not missing from it."""
    params = SamplingParams(max_tokens=MAX_TOKENS, repetition_penalty=1.3, frequency_penalty=0.5)
    expected = outputs(converse(LLM(engine_config(tiny_llama, 16, None, caching=False)), params))
    llm = LLM(engine_config(tiny_llama, 16, None, caching=True))
    assert outputs(converse(llm, params)) == expected
    assert llm.engine.scheduler.block_manager.num_hit_tokens > 0


def test_caching_off_reports_no_cached_tokens(tiny_llama: str) -> None:
    llm = LLM(engine_config(tiny_llama, 16, None, caching=False))
    first, second = converse(llm, SamplingParams(max_tokens=4))
    assert all(c.metrics.num_cached_tokens == 0 for c in first + second)
    assert llm.engine.scheduler.block_manager.num_cached_blocks == 0


def test_the_conversation_bench_replays_every_turn_with_identical_answers(tiny_llama: str, tmp_path) -> None:
    """``binserve bench conversations`` on the tiny model (with a chat template): a smoke run, no timing."""
    import argparse
    import json

    from bench.conversations import cmd_bench_conversations, register, render
    from tests.test_chat import make_chat_model

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    model_dir = make_chat_model(tiny_llama, tmp_path / "chat")
    args = parser.parse_args(
        [
            "conversations",
            "--model",
            model_dir,
            "--num-conversations",
            "2",
            "--max-turns",
            "3",
            "--rate",
            "100",
        ]
        + [
            "--think-s",
            "0.01",
            "--max-output-tokens",
            "8",
            "--max-model-len",
            "1024",
            "--json",
            str(tmp_path / "c.json"),
        ]
    )
    assert cmd_bench_conversations(args) == 0
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["identical_greedy_outputs"]
    on, off = report["rows"]["caching on"], report["rows"]["caching off"]
    assert on["num_turns"] == off["num_turns"] >= 4 and on["num_follow_up_turns"] >= 2
    assert off["cached_prompt_tokens"] == 0 < on["cached_prompt_tokens"]
    assert 0.0 <= report["rerender"]["matching_fraction_tokens"] <= 1.0
    assert [t["value"] for t in report["targets"]] == [report["follow_up_ttft_p50_speedup"]]
    assert "| caching off |" in render(report) and "| caching on |" in render(report)


def test_the_zero_hit_bench_pairs_runs_and_renders_its_target(tiny_llama: str, tmp_path) -> None:
    """``binserve bench prefix-overhead`` on the tiny model: alternating pairs, no hits, a judged target."""
    import argparse
    import json

    from bench.prefix_overhead import register, render

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "prefix_overhead.json"
    args = parser.parse_args(
        ["prefix-overhead", "--model", tiny_llama, "--num-requests", "3", "--pairs", "2", "--json", str(out)]
    )
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert [(r["pair"], r["caching"]) for r in report["runs"]] == [
        (0, False),
        (0, True),
        (1, True),
        (1, False),
    ]
    assert all(r["hit_tokens"] == 0 for r in report["runs"])
    assert report["targets"][0]["threshold"] == 1.02
    assert "On / off: CPU per token" in render(report)
