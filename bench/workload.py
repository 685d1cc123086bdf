"""Benchmark workloads from the shared data: real prompts with their real output lengths, in tokens.

requests = sharegpt_requests(tokenizer, num_requests=256, seed=0)
"""

from __future__ import annotations

import csv
import gzip
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
DEFAULT_SHAREGPT = DATA_DIR / "sharegpt_pairs.jsonl.gz"
AZURE_TRACES = ("code", "conv")


@dataclass(frozen=True)
class WorkloadRequest:
    prompt: str
    prompt_token_ids: tuple[int, ...]
    output_tokens: int
    """The forced output length (the real response's length under the served tokenizer, capped)."""
    arrival_s: float = 0.0
    """Seconds after the start of the run."""


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


def poisson_arrivals(num_requests: int, rate_per_s: float, seed: int = 0) -> list[float]:
    """Arrival times of a Poisson process (exponential gaps) starting at 0."""
    return gamma_arrivals(num_requests, rate_per_s, cv=1.0, seed=seed)


def gamma_arrivals(num_requests: int, rate_per_s: float, cv: float, seed: int = 0) -> list[float]:
    """Arrival times with Gamma-distributed gaps of mean ``1/rate`` and coefficient of variation ``cv``
    (cv 1 is Poisson; above 1 is burstier)."""
    if rate_per_s <= 0:
        raise ValueError(f"rate: must be > 0 requests/s, got {rate_per_s}")
    if cv <= 0:
        raise ValueError(f"cv: must be > 0, got {cv}")
    rng = random.Random(seed)
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate_per_s * shape)
    t, times = 0.0, []
    for _ in range(num_requests):
        times.append(t)
        t += rng.gammavariate(shape, scale)
    return times


def with_arrivals(requests: Sequence[WorkloadRequest], arrivals_s: Sequence[float]) -> list[WorkloadRequest]:
    if len(arrivals_s) != len(requests):
        raise ValueError(f"arrivals: need one per request ({len(requests)}), got {len(arrivals_s)}")
    return [replace(r, arrival_s=a) for r, a in zip(requests, arrivals_s, strict=True)]


def azure_requests(
    trace: str,
    num_requests: int,
    time_scale: float = 1.0,
    max_prompt_tokens: int = 2048,
    max_output_tokens: int = 512,
    data_dir: str | Path = DATA_DIR,
) -> list[WorkloadRequest]:
    """The first ``num_requests`` of an Azure 2023 trace (``code`` or ``conv``): real arrival times
    (multiplied by ``time_scale``; below 1 compresses the trace) and token counts, capped. The trace
    has no text, so prompts are filler token ids of the right length (and no predictor input)."""
    if trace not in AZURE_TRACES:
        raise ValueError(f"trace: must be one of {', '.join(AZURE_TRACES)}, got {trace!r}")
    if time_scale <= 0:
        raise ValueError(f"time_scale: must be > 0, got {time_scale}")
    path = Path(data_dir) / f"azure2023_{trace}.csv"
    if not path.is_file():
        raise ValueError(f"data: {str(path)!r} does not exist")
    with path.open() as f:
        rows = [row for _, row in zip(range(num_requests), csv.DictReader(f), strict=False)]
    stamps = [datetime.fromisoformat(r["TIMESTAMP"][:26]) for r in rows]
    start = stamps[0] if stamps else None
    return [
        WorkloadRequest(
            prompt="",
            prompt_token_ids=(1,) * max(1, min(int(r["ContextTokens"]), max_prompt_tokens)),
            output_tokens=max(1, min(int(r["GeneratedTokens"]), max_output_tokens)),
            arrival_s=(stamp - start).total_seconds() * time_scale,
        )
        for r, stamp in zip(rows, stamps, strict=True)
    ]
