"""Write a small seeded random-weights checkpoint in Hugging Face format, with a real tokenizer.

    binserve make-tiny-model /tmp/tiny --arch llama --seed 0

The tokenizer is a byte-level BPE (8,192 tokens), trained once on ShareGPT texts and shipped in
``workers/assets/tokenizer.json`` (nothing reads the texts at run time), so token counts behave like a real
model's and nothing is downloaded. The weights are random but seeded: the same arguments always write
the same checkpoint, which tests, the demo and the benchmarks rely on.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

TOKENIZER_PATH = Path(__file__).parent / "assets" / "tokenizer.json"
ARCHES = ("llama", "qwen2")
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def load_tiny_tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_file=str(TOKENIZER_PATH), eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, bos_token=EOS_TOKEN
    )


def make_tiny_model(
    out_dir: str | Path, arch: str = "llama", seed: int = 0, hidden_size: int = 128, num_layers: int = 4
) -> Path:
    """Write config.json, model.safetensors and the tokenizer files to ``out_dir``; return it.

    The defaults are the tiny test model; larger sizes (benchmarks) keep its shape: 32-wide heads,
    two query heads per KV head, an MLP three times the hidden size."""
    if arch not in ARCHES:
        raise ValueError(f"arch: must be one of {', '.join(ARCHES)}, got {arch!r}")
    if hidden_size < 64 or hidden_size % 64:
        raise ValueError(f"hidden_size: must be a positive multiple of 64, got {hidden_size}")
    if num_layers < 1:
        raise ValueError(f"num_layers: must be >= 1, got {num_layers}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tiny_tokenizer()
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=3 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 32,
        num_key_value_heads=hidden_size // 64,  # grouped-query attention, as in the real models
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        # A wide init keeps the random model's logits well apart, so greedy decoding has no near-ties
        # and token parity with transformers is a sharp test rather than a coin toss.
        initializer_range=0.2,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":
        config = LlamaConfig(
            **common,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 1024,
            },
        )
        model_cls = LlamaForCausalLM
    else:
        config = Qwen2Config(
            **common, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6}
        )
        model_cls = Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if arch == "qwen2":
        # Qwen2's q/k/v biases start at zero; give them values so the bias path is really exercised.
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.2)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
