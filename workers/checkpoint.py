"""Reading a Hugging Face checkpoint directory: config, tokenizer and safetensors weights.

Only the Llama family layout is accepted (Llama, Mistral, Qwen2); anything else is refused up front
with the supported list rather than failing halfway through a load.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from pipeline.sampling import model_sampling_defaults

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2")
# RoPE variants whose frequencies do not depend on the sequence length, so one table serves every step.
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3", "yarn")


def checkpoint_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    if not path.is_dir():
        raise ValueError(f"model: directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise ValueError(f"model: {str(path)!r} has no config.json (not a Hugging Face checkpoint directory)")
    return path


def load_config(model_dir: str | Path) -> PretrainedConfig:
    path = checkpoint_dir(model_dir)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model: model_type {config.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    rope_type = rope_parameters(config).get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"model: rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return config


def rope_parameters(config: PretrainedConfig) -> dict:
    config.standardize_rope_params()
    return dict(config.rope_parameters or {})


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(checkpoint_dir(model_dir), local_files_only=True)


def model_sampling_defaults_of(model_dir: str | Path) -> dict[str, float | int]:
    """The sampling defaults the model's ``generation_config.json`` states (``pipeline/sampling.py`` says which
    fields are taken); ``{}`` without one."""
    path = Path(model_dir) / "generation_config.json"
    return model_sampling_defaults(json.loads(path.read_text()) if path.is_file() else {})


def eos_token_ids(model_dir: str | Path, config: PretrainedConfig) -> tuple[int, ...]:
    """End-of-sequence ids as ``generate`` uses them: generation_config.json first, then config.json."""
    ids = config.eos_token_id
    if (Path(model_dir) / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(model_dir, local_files_only=True)
        ids = generation.eos_token_id if generation.eos_token_id is not None else ids
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, list | tuple) else (int(ids),)


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({path / name for name in weight_map.values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model: {str(path)!r} has no *.safetensors weights")
    return files


def iter_weights(model_dir: str | Path, wanted: Callable[[str], bool]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for the checkpoint's tensors whose name ``wanted`` accepts (CPU tensors)."""
    for file in _weight_files(checkpoint_dir(model_dir)):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if wanted(name):
                    yield name, f.get_tensor(name)
