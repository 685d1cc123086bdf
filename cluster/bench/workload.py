"""Benchmark workloads from the shared data: real prompts with their real output lengths, in tokens.

requests = sharegpt_requests(tokenizer, num_requests=256, seed=0)
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SHAREGPT = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "sharegpt_pairs.jsonl.gz"


@dataclass(frozen=True)
class WorkloadRequest:
    prompt: str
    prompt_token_ids: tuple[int, ...]
    output_tokens: int
    """The forced output length (the real response's length under the served tokenizer, capped)."""


def read_sharegpt(path: str | Path = DEFAULT_SHAREGPT) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"data: {str(path)!r} does not exist (expected ../shared/data/sharegpt_pairs.jsonl.gz)"
        )
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def sharegpt_requests(
    tokenizer,  # a transformers tokenizer
    num_requests: int,
    seed: int = 0,
    max_prompt_tokens: int = 512,
    max_output_tokens: int = 256,
    path: str | Path = DEFAULT_SHAREGPT,
) -> list[WorkloadRequest]:
    """Draw ``num_requests`` ShareGPT pairs (seeded); prompts are truncated and outputs capped to the limits,
    so a long-tailed pair still counts, at the cap, rather than being dropped."""
    rows = read_sharegpt(path)
    rng = random.Random(seed)
    picked = rng.sample(rows, min(num_requests, len(rows)))
    prompts = tokenizer([r["prompt"] for r in picked]).input_ids
    outputs = tokenizer([r["response"] for r in picked], add_special_tokens=False).input_ids
    return [
        WorkloadRequest(
            prompt=row["prompt"],
            prompt_token_ids=tuple(p[:max_prompt_tokens]) or (0,),
            output_tokens=max(1, min(len(o), max_output_tokens)),
        )
        for row, p, o in zip(picked, prompts, outputs, strict=True)
    ]
