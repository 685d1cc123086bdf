"""How a model is cut into pipeline stages: contiguous layer ranges of about equal compute.

    ranges = stage_layer_ranges(hf_config, num_stages=2, tokens_per_step=512, sampled_rows_per_step=32)

A stage's time goes to compute, so the split balances an estimate of each stage's FLOPs on a
representative micro-batch, not its parameter count or its number of layers:

- a decoder layer costs 2 FLOPs per parameter for every token of the micro-batch;
- the embedding (first stage) is a table lookup: vocab x hidden parameters but no FLOPs. A split by
  parameters would give the first stage fewer layers for holding it, which is exactly wrong;
- ``lm_head`` (last stage) costs 2 x vocab x hidden per *sampled row* only, because the runner projects
  just the last position of each chunk that completes its prefix. Its weight therefore depends on the
  batch: negligible in a prefill chunk, several layers' worth per token in a decode-only batch. The
  representative micro-batch is a SARATHI one: ``chunk_size`` tokens with one sampled row per decode;
- attention scores (about 4 x context x hidden FLOPs per token and layer) cost the same in every layer,
  so they only move the layer/head balance a little; they are left out of the estimate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PretrainedConfig

from workers.model import DecoderLayer, DecoderStage, head_dim_of


def num_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def layer_parameters(hf_config: PretrainedConfig) -> int:
    """Parameters of one decoder layer (built on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        return num_parameters(DecoderLayer(hf_config))


def stage_parameters(hf_config: PretrainedConfig, layer_range: tuple[int, int]) -> int:
    """Parameters a stage holds, embedding and head included (for its weight memory)."""
    with torch.device("meta"):
        return num_parameters(DecoderStage(hf_config, *layer_range))


def split_layers(
    layer_costs: Sequence[float], last_stage_extra: float, num_stages: int
) -> list[tuple[int, int]]:
    """Contiguous ranges ``[start, end)``, one per stage and each at least one layer, that minimise the
    largest stage cost; ``last_stage_extra`` is added to the last stage (the head)."""
    num_layers = len(layer_costs)
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"pp_size: must be in [1, {num_layers}] (the model's layers), got {num_stages}")
    prefix = [0.0]
    for cost in layer_costs:
        prefix.append(prefix[-1] + cost)

    def span(start: int, end: int) -> float:
        return prefix[end] - prefix[start] + (last_stage_extra if end == num_layers else 0.0)

    # best[s][e]: the smallest largest-stage cost of splitting layers [0, e) into s stages; cut[s][e] its
    # last cut. A layer is ~100 and pp_size ~10 at most, so the O(pp * L^2) table is instant.
    inf = float("inf")
    best = [[inf] * (num_layers + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (num_layers + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for e in range(s, num_layers + 1):
            for m in range(s - 1, e):
                cost = max(best[s - 1][m], span(m, e))
                if cost < best[s][e]:
                    best[s][e], cut[s][e] = cost, m
    ranges, end = [], num_layers
    for s in range(num_stages, 0, -1):
        ranges.append((cut[s][end], end))
        end = cut[s][end]
    return ranges[::-1]


def stage_layer_ranges(
    hf_config: PretrainedConfig, num_stages: int, tokens_per_step: int, sampled_rows_per_step: int
) -> list[tuple[int, int]]:
    """Layer ranges of about equal FLOPs for a micro-batch of ``tokens_per_step`` tokens of which
    ``sampled_rows_per_step`` go through ``lm_head``."""
    layer_flops = 2.0 * layer_parameters(hf_config) * tokens_per_step
    head_flops = 2.0 * hf_config.vocab_size * hf_config.hidden_size * sampled_rows_per_step
    return split_layers([layer_flops] * hf_config.num_hidden_layers, head_flops, num_stages)


def kv_block_bytes(hf_config: PretrainedConfig, num_layers: int, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block across ``num_layers`` layers: keys and values, every KV head."""
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    return 2 * num_layers * block_size * num_kv_heads * head_dim_of(hf_config) * dtype.itemsize
