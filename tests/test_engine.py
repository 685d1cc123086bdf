"""The engine on real tiny checkpoints: token parity with transformers, preemption, sampling, bad input."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pipeline.request import FinishReason, NewRequest, SamplingParams
from workers.llm import LLM

PROMPTS = [
    "Hello",
    "What is the capital of France? Please answer briefly.",
    "Write a poem about the sea, the sky and all the things in between them. " * 3,
    "a b c d e f g",
    "Explain quantum computing in simple terms to a ten year old child.",
    "x",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "How do I sort a list of dictionaries by a key in Python?",
    "List three colours.",
]
MAX_TOKENS = 20

_reference_cache: dict[str, list[list[int]]] = {}


def hf_greedy(model_dir: str, llm: LLM) -> list[list[int]]:
    """transformers' own generate, one prompt at a time (no padding), greedy."""
    if model_dir not in _reference_cache:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        refs = []
        for prompt in PROMPTS:
            ids = torch.tensor([llm.encode(prompt)])
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False
            )
            refs.append(out[0, ids.shape[1] :].tolist())
        _reference_cache[model_dir] = refs
    return _reference_cache[model_dir]


def make_llm(model_dir: str, **kwargs: object) -> LLM:
    scheduler = {k: v for k, v in kwargs.items() if k in SchedulerConfig.__dataclass_fields__}
    cache = {k: v for k, v in kwargs.items() if k in CacheConfig.__dataclass_fields__}
    model = {k: v for k, v in kwargs.items() if k in ModelConfig.__dataclass_fields__}
    return LLM(
        EngineConfig(
            ModelConfig(model_dir, **model),
            cache=CacheConfig(**cache),
            scheduler=SchedulerConfig(**scheduler),
        )
    )


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("chunk_size", [16, 64, 4096])
def test_greedy_tokens_equal_transformers_generate(tiny_model_factory, arch: str, chunk_size: int) -> None:
    model_dir = tiny_model_factory(arch)
    llm = make_llm(model_dir, chunk_size=chunk_size, kv_cache_bytes=64 * 2**20)
    done = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS))  # all decoded together
    assert [list(d.completion.output_token_ids) for d in done] == hf_greedy(model_dir, llm)
    assert llm.engine.scheduler.block_manager.num_free_blocks == llm.runner.num_blocks


@pytest.mark.parametrize("policy", ["prefill_first", "static", "dynamic"])
def test_baseline_policies_give_the_same_greedy_tokens(tiny_llama: str, policy: str) -> None:
    llm = make_llm(
        tiny_llama, policy=policy, max_num_seqs=4, batch_wait_timeout_s=0.0, kv_cache_bytes=64 * 2**20
    )
    done = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS))
    assert [list(d.completion.output_token_ids) for d in done] == hf_greedy(tiny_llama, llm)


def test_preemption_path_gives_the_same_tokens_and_returns_every_block(tiny_llama: str) -> None:
    # 10 blocks of 16 tokens hold 160 tokens; the prompts and outputs together need several times that.
    llm = make_llm(tiny_llama, chunk_size=32, block_size=16, num_blocks=10, max_model_len=160)
    done = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS))
    assert [list(d.completion.output_token_ids) for d in done] == hf_greedy(tiny_llama, llm)
    assert sum(d.completion.metrics.num_preemptions for d in done) > 0
    assert llm.engine.scheduler.block_manager.num_free_blocks == 10


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(tiny_llama: str) -> None:
    llm = make_llm(tiny_llama, kv_cache_bytes=16 * 2**20)
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    [alone] = llm.generate(["Tell me a story."], params)
    together = llm.generate(["Tell me a story.", "Another prompt", "x"], params)
    assert alone.completion.output_token_ids == together[0].completion.output_token_ids
    other_seed = llm.generate(["Tell me a story."], SamplingParams(**{**params.__dict__, "seed": 99}))
    assert other_seed[0].completion.output_token_ids != alone.completion.output_token_ids
    [top1] = llm.generate(["Tell me a story."], SamplingParams(max_tokens=12, temperature=1.0, top_k=1))
    [greedy] = llm.generate(["Tell me a story."], SamplingParams(max_tokens=12))
    assert top1.completion.output_token_ids == greedy.completion.output_token_ids


def test_ignore_eos_forces_the_output_length(tiny_llama: str) -> None:
    llm = make_llm(tiny_llama, kv_cache_bytes=16 * 2**20)
    done = llm.generate(PROMPTS[:4], SamplingParams(max_tokens=40, ignore_eos=True))
    assert all(len(d.completion.output_token_ids) == 40 for d in done)
    assert all(d.completion.finish_reason is FinishReason.LENGTH for d in done)


def test_bad_input_names_the_field_and_the_engine_keeps_serving(tiny_llama: str) -> None:
    llm = make_llm(tiny_llama, kv_cache_bytes=16 * 2**20, max_model_len=64)
    engine = llm.engine
    engine.add_request(
        NewRequest("good", llm.encode("Hello there"), SamplingParams(max_tokens=5, ignore_eos=True))
    )
    with pytest.raises(ValueError, match=r"prompt: must be a non-empty string"):
        llm.encode("")
    with pytest.raises(ValueError, match=r"prompt: 64 tokens, must be at most 63"):
        engine.add_request(NewRequest("long", list(range(64)), SamplingParams()))
    for field, kwargs in [
        ("max_tokens", dict(max_tokens=0)),
        ("temperature", dict(temperature=-1.0)),
        ("top_p", dict(top_p=0.0)),
        ("top_p", dict(top_p=1.01)),
    ]:
        with pytest.raises(ValueError, match=rf"{field}: must be in .*got"):
            SamplingParams(**kwargs)
    outputs = []
    while engine.has_unfinished:
        outputs += engine.step()
    assert [o.request_id for o in outputs] == ["good"] * 5
    assert engine.scheduler.block_manager.num_free_blocks == llm.runner.num_blocks


def test_unknown_model_directory_is_a_value_error(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"model: directory .* does not exist"):
        make_llm(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"model: .* has no config.json"):
        make_llm(str(tmp_path / "empty"))


def test_kv_pool_too_small_for_one_sequence_is_refused(tiny_llama: str) -> None:
    with pytest.raises(
        ValueError, match=r"kv cache: 2 blocks of 16 tokens hold 32 tokens, fewer than max_model_len 64"
    ):
        make_llm(tiny_llama, num_blocks=2, block_size=16, max_model_len=64)


def test_an_unset_max_model_len_is_capped_to_what_the_kv_pool_holds(tiny_llama: str, caplog) -> None:
    llm = make_llm(tiny_llama, num_blocks=2, block_size=16)
    assert llm.engine.scheduler.max_model_len == 32
    assert "max_model_len: 32 tokens, what the KV cache holds" in caplog.text


def test_mistral_sliding_window_linear_rope_and_multi_query(tmp_path) -> None:
    """A Mistral checkpoint with a 12-token sliding window, linear RoPE scaling and one KV head: prompts
    longer than the window, chunked at 8, still give transformers' greedy tokens."""
    from transformers import MistralConfig, MistralForCausalLM

    from workers.tiny_model import load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer()
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=512,
        sliding_window=12,
        initializer_range=0.2,
        eos_token_id=tokenizer.eos_token_id,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    )
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    llm = make_llm(str(tmp_path), chunk_size=8, kv_cache_bytes=8 * 2**20)
    prompts = [
        "The quick brown fox jumps over the lazy dog. " * 3,
        "hi",
        "one two three four five six seven eight nine",
    ]
    done = llm.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True))
    for prompt, d in zip(prompts, done, strict=True):
        ids = torch.tensor([llm.encode(prompt)])
        out = reference.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False, eos_token_id=None
        )
        assert list(d.completion.output_token_ids) == out[0, ids.shape[1] :].tolist()


def test_stages_are_materialised_in_the_serving_dtype(tiny_llama: str, monkeypatch) -> None:
    """Weights are cast on the meta device, so no fp32 copy is ever allocated for a bf16 model (on CUDA
    that copy stayed cached and the KV pool was sized ~4 bytes a parameter short)."""
    from workers.checkpoint import load_config
    from workers.model import DecoderStage
    from workers.runner import empty_stage

    dtypes_at_materialisation: list[set] = []
    to_empty = DecoderStage.to_empty

    def spy(self, *, device, recurse=True):
        dtypes_at_materialisation.append({p.dtype for p in self.parameters()})
        return to_empty(self, device=device, recurse=recurse)

    monkeypatch.setattr(DecoderStage, "to_empty", spy)
    stage = empty_stage(load_config(tiny_llama), 0, 4, torch.bfloat16, torch.device("cpu"))
    assert dtypes_at_materialisation == [{torch.bfloat16}]
    assert {p.dtype for p in stage.parameters()} == {torch.bfloat16}
    assert all(p.device.type == "cpu" for p in stage.parameters())


def test_repetition_penalty_greedy_tokens_equal_transformers(tiny_llama: str) -> None:
    llm = make_llm(tiny_llama, chunk_size=16, kv_cache_bytes=64 * 2**20)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    expected = []
    for prompt in PROMPTS[:5]:
        ids = torch.tensor([llm.encode(prompt)])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            repetition_penalty=2.0,
        )
        expected.append(out[0, ids.shape[1] :].tolist())
    done = llm.generate(PROMPTS[:5], SamplingParams(max_tokens=MAX_TOKENS, repetition_penalty=2.0))
    assert [list(d.completion.output_token_ids) for d in done] == expected


def test_repetition_penalty_equals_transformers_logits_processor() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    from pipeline.plan import ScheduledChunk
    from workers.sampler import penalize

    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0)) * 3
    history = (3, 7, 7, 11, 40, 3, 0)
    chunk = ScheduledChunk("r", (0,), 7, (0,), SamplingParams(repetition_penalty=1.7), 3, False, history, 4)
    expected = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([history]), logits.clone())
    assert torch.equal(penalize(logits[0], chunk), expected[0])


def test_presence_and_frequency_penalties_follow_openai() -> None:
    """logit[t] -= frequency_penalty * count(t in output) + presence_penalty * (count > 0); the prompt's
    tokens are not counted."""
    from pipeline.plan import ScheduledChunk
    from workers.sampler import sample

    logits = torch.tensor([[2.0, 1.9, 1.5, 0.0]])
    params = SamplingParams(presence_penalty=0.05, frequency_penalty=0.1)
    chunk = ScheduledChunk("r", (0,), 4, (0,), params, 2, history_token_ids=(1, 1, 0, 0), num_prompt_tokens=2)
    # Token 0 is twice in the output: 2.0 - 0.2 - 0.05 = 1.75 < 1.9 (token 1 is only in the prompt).
    assert sample(logits, (chunk,)) == [1]
    assert sample(logits, (ScheduledChunk("r", (0,), 4, (0,), SamplingParams(), 2),)) == [0]
    with pytest.raises(ValueError, match=r"presence_penalty: must be in \[-2.0, 2.0\]"):
        SamplingParams(presence_penalty=3.0)
    with pytest.raises(ValueError, match=r"repetition_penalty: must be in \(0, 2\]"):
        SamplingParams(repetition_penalty=0.0)


@pytest.mark.parametrize("start_pos, q_len, max_float_mask", [(0, 37, 2**24), (45, 19, 2**24), (45, 19, 0)])
def test_cpu_prefill_attention_equals_reference(
    monkeypatch, start_pos: int, q_len: int, max_float_mask: int
) -> None:
    """A prefill chunk over a paged cached prefix (float mask, or boolean past the float mask's size) gives
    what plain attention over its unpaged keys and values gives: every query head reads its grouped KV head,
    positions up to its own."""
    import workers.attention as attention
    from pipeline.plan import ScheduledChunk, StepPlan

    monkeypatch.setattr(attention, "_MAX_FLOAT_MASK", max_float_mask)
    heads, kv_heads, dim, block, kv_len = 9, 3, 16, 8, start_pos + q_len
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(q_len, heads, dim, generator=gen)
    keys, values = torch.randn(2, kv_len, kv_heads, dim, generator=gen)
    blocks = tuple(reversed(range(1, -(-kv_len // block) + 1)))  # out of order: the table is what counts
    cache = torch.zeros(2, kv_heads, len(blocks) + 1, block, dim)
    if start_pos:  # the cached prefix, written by earlier steps
        prefix = attention.AttentionMetadata.build(
            StepPlan(0, (ScheduledChunk("r", (0,) * start_pos, 0, blocks, None, 0),)),
            block,
            None,
            cache.device,
        )
        attention.write_kv(cache, keys[:start_pos], values[:start_pos], prefix.slot_mapping)
    chunk = ScheduledChunk("r", (0,) * q_len, start_pos, blocks, None, 0)
    meta = attention.AttentionMetadata.build(StepPlan(1, (chunk,)), block, None, cache.device)
    got = attention.paged_attention(query, keys[start_pos:], values[start_pos:], cache, meta, 0.25)

    group = heads // kv_heads
    scores = torch.einsum("qhd,khd->hqk", query, keys.repeat_interleave(group, 1)) * 0.25
    visible = torch.arange(kv_len)[None, :] <= torch.arange(start_pos, kv_len)[:, None]
    weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    expected = torch.einsum("hqk,khd->qhd", weights, values.repeat_interleave(group, 1))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
