"""A Llama-family decoder (Llama, Mistral, Qwen2) over a contiguous range of layers.

One class covers the family: grouped-query attention, RoPE (default, linear, llama3, yarn scaling),
RMSNorm, SwiGLU, optional q/k/v bias (Qwen2), optional tied embeddings, optional sliding window
(Mistral). A stage holds layers ``[layer_start, layer_end)``; the first stage also embeds tokens and
the last also holds the final norm and ``lm_head``, so a pipeline splits the model without rework.

Activations are flattened: ``(T, hidden)`` for the ``T`` tokens of a mixed batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from workers.attention import AttentionMetadata, paged_attention
from workers.checkpoint import rope_parameters


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window_of(config: PretrainedConfig) -> int | None:
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        return None
    return getattr(config, "sliding_window", None)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as transformers does; bf16 variance loses too much precision.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Rotary(nn.Module):
    """cos/sin tables indexed by absolute position; scaling variants come from transformers' RoPE init."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        rope_type = rope_parameters(config).get("rope_type", "default")
        with torch.device("cpu"):  # computed, never loaded: stays real when the stage is built on "meta"
            inv_freq, self.attention_scaling = self._inv_freq(config, rope_type)
        # A plain attribute rather than a buffer, so ``to_empty`` after a meta-device build keeps it.
        self.inv_freq = inv_freq.float()

    @staticmethod
    def _inv_freq(config: PretrainedConfig, rope_type: str) -> tuple[torch.Tensor, float]:
        if rope_type == "default":
            theta = rope_parameters(config).get("rope_theta", 10000.0)
            dim = head_dim_of(config)
            return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
        return ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # (T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (T, 1, D)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(config)
        bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.scale = self.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q = _rotate(self.q_proj(x).view(num_tokens, self.num_heads, self.head_dim), cos, sin)
        k = _rotate(self.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        out = paged_attention(q, k, v, cache, meta, self.scale)  # (T, H, D)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"model: hidden_act {config.hidden_act!r} is not supported; supported: silu")
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache, meta):  # noqa: ANN001 (shapes as in DecoderStage.forward)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStage(nn.Module):
    """Layers ``[layer_start, layer_end)`` of the model, plus embeddings (first) and head (last)."""

    def __init__(self, config: PretrainedConfig, layer_start: int, layer_end: int) -> None:
        super().__init__()
        if not 0 <= layer_start < layer_end <= config.num_hidden_layers:
            raise ValueError(
                f"layer range: must satisfy 0 <= start < end <= {config.num_hidden_layers}, "
                f"got [{layer_start}, {layer_end})"
            )
        self.layer_start, self.layer_end = layer_start, layer_end
        self.is_first = layer_start == 0
        self.is_last = layer_end == config.num_hidden_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if self.is_first else None
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(layer_start, layer_end))
        self.rotary = Rotary(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if self.is_last else None
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if self.is_last else None

    def checkpoint_name(self, param_name: str) -> str:
        """Map a parameter of this stage to its tensor name in the checkpoint."""
        if param_name.startswith("layers."):
            index, rest = param_name[len("layers.") :].split(".", 1)
            return f"model.layers.{int(index) + self.layer_start}.{rest}"
        if param_name.startswith("lm_head."):
            return param_name
        return f"model.{param_name}"

    def forward(
        self,
        inputs: torch.Tensor,
        caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """inputs: token ids (T,) on the first stage, else hidden states (T, hidden).

        Returns hidden states (T, hidden); on the last stage they are final-normed.
        """
        x = self.embed_tokens(inputs) if self.is_first else inputs
        cos, sin = self.rotary(meta.positions, x.dtype)
        for layer, cache in zip(self.layers, caches, strict=True):
            x = layer(x, cos, sin, cache, meta)
        return self.norm(x) if self.is_last else x
