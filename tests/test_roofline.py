"""The roofline bench's arithmetic: what one decode step must read and compute, counted by hand for the
tiny model, and the plan it times (decodes only, each at the asked context, blocks drawn from the pool)."""

from __future__ import annotations

import pytest

from bench.roofline import build_runner, decode_plan, step_cost


def test_decode_plan_shape() -> None:
    plan = decode_plan(batch=5, context_tokens=40, block_size=16, num_blocks=16)
    assert len(plan.chunks) == 5 and all(c.is_decode and c.end_pos == 40 for c in plan.chunks)
    blocks = [b for c in plan.chunks for b in c.block_ids]
    assert len(blocks) == 5 * 3 == len(set(blocks))  # 3 blocks a request, none shared
    with pytest.raises(ValueError, match="batch"):
        decode_plan(batch=6, context_tokens=40, block_size=16, num_blocks=16)


def test_step_cost_counts_weights_kv_and_flops(tiny_llama: str) -> None:
    runner = build_runner(tiny_llama, max_batch=4, context_tokens=32, dtype="float32", device="cpu")
    config = runner.hf_config
    hidden, vocab, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    head_dim = hidden // config.num_attention_heads
    params = sum(p.numel() for p in runner.stage.parameters()) - vocab * hidden  # all but the embedding
    batch, context = 4, 32
    bytes_read, flops = step_cost(runner, batch, context)
    kv_bytes = 2 * layers * config.num_key_value_heads * head_dim * context * batch * 4
    assert bytes_read == params * 4 + batch * hidden * 4 + kv_bytes
    attention_flops = 4 * layers * config.num_attention_heads * head_dim * context * batch
    assert flops == 2 * params * batch + attention_flops
