"""Seeded random-weights checkpoints in the real shapes of released models, written directly in bf16.

    binserve make-tiny-model /tmp/llama3-8b --shape llama-3-8b     # 16 GB of bf16, no fp32 copy
    write_random_checkpoint("/tmp/l1b", SHAPES["llama-3.2-1b"], device="cuda")

What a GPU check needs where no hub can be reached: a checkpoint whose every tensor has the real model's
shape and dtype, so step times, memory and bandwidth are the real model's (they do not depend on the
values). Each tensor is drawn on ``device`` (a GPU draws 8 billion values in well under a second), moved
to the host one shard at a time and written as safetensors, one shard per decoder layer: the host never
holds more than one layer, and no fp32 copy of the model exists anywhere.

The tokenizer is the tiny test model's 8,192-token BPE (``workers/assets``): every id it emits is a valid
id of the real 128,256-token vocabulary, so prompts work unchanged; sampled ids above 8,191 just have no
text. The ``smoke-*`` shapes keep each real shape's structure (grouped-query ratio, tied or separate head,
RoPE variant) at a size a CPU runs in seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_LLAMA3_ROPE_SCALING = {  # Llama 3.1 / 3.2's long-context RoPE, as in their config.json
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@dataclass(frozen=True)
class ModelShape:
    """The fields of a Llama-family config.json that fix every tensor's shape."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    rope_scaling: dict | None = None
    init_std: float = 0.02
    """Standard deviation of every weight matrix (transformers' ``initializer_range`` for Llama)."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Checkpoint tensor name -> shape, in Hugging Face Llama naming."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            shapes |= {
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (self.intermediate_size, h),
                p + "mlp.up_proj.weight": (self.intermediate_size, h),
                p + "mlp.down_proj.weight": (h, self.intermediate_size),
            }
        shapes["model.norm.weight"] = (h,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        return shapes

    @property
    def num_parameters(self) -> int:
        return sum(_numel(s) for s in self.tensor_shapes().values())

    def hf_config(self, eos_token_id: int, bos_token_id: int) -> dict:
        """config.json as the hub writes it for this model (``rope_theta`` / ``rope_scaling`` keys, which
        every transformers version reads)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "initializer_range": self.init_std,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "torch_dtype": "bfloat16",
        }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


SHAPES: dict[str, ModelShape] = {
    s.name: s
    for s in (
        # meta-llama/Llama-3.2-1B: 1.24e9 parameters, tied embeddings, 64-wide heads.
        ModelShape("llama-3.2-1b", 2048, 8192, 16, 32, 8, 128256, True, 131072, _LLAMA3_ROPE_SCALING),
        # meta-llama/Meta-Llama-3-8B: 8.03e9 parameters, plain RoPE, separate lm_head.
        ModelShape("llama-3-8b", 4096, 14336, 32, 32, 8, 128256, False, 8192),
        # CPU stand-ins for the smoke run: the same structure, a few hundred thousand parameters.
        ModelShape("smoke-1b", 128, 512, 2, 4, 1, 8192, True, 131072, _LLAMA3_ROPE_SCALING, init_std=0.2),
        ModelShape("smoke-8b", 256, 896, 2, 4, 1, 8192, False, 4096, init_std=0.2),
    )
}


def write_random_checkpoint(
    out_dir: str | Path, shape: ModelShape, seed: int = 0, device: str | torch.device = "cpu"
) -> Path:
    """Write config.json, one safetensors shard per layer (plus one for embeddings, norm and head), their
    index and the tokenizer to ``out_dir``; return it. Norm weights are ones, matrices N(0, init_std²),
    drawn in bf16 on ``device`` from one generator seeded with ``seed`` (the same on the same device)."""
    import torch  # here, so the shape table is read (by the CLI's flags) without loading torch
    from safetensors.torch import save_file

    from workers.tiny_model import load_tiny_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    shards: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, tensor_shape in shape.tensor_shapes().items():
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        file = f"model-layer-{int(layer):03d}.safetensors" if layer is not None else "model-outer.safetensors"
        shards.setdefault(file, {})[name] = tensor_shape
    weight_map = {}
    for file, tensors in shards.items():
        host = {}
        for name, tensor_shape in tensors.items():
            if name.endswith("norm.weight"):
                value = torch.ones(tensor_shape, dtype=torch.bfloat16)
            else:
                value = torch.empty(tensor_shape, dtype=torch.bfloat16, device=device)
                value.normal_(0.0, shape.init_std, generator=generator)
            host[name] = value.cpu().contiguous()
            weight_map[name] = file
        save_file(host, str(out / file), metadata={"format": "pt"})
    total_bytes = 2 * shape.num_parameters
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=1) + "\n"
    )
    tokenizer = load_tiny_tokenizer()
    config = shape.hf_config(tokenizer.eos_token_id, tokenizer.bos_token_id)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(out)
    return out
