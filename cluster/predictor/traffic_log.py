"""Record what the served model really produced, so the predictor can be refit to it.

    log = TrafficLog("out/traffic.jsonl")
    log.append(prompt, output_tokens=len(generated_ids))
    # later: binserve train-predictor --data out/traffic.jsonl --tokenizer MODEL_DIR --out DIR

Each line is ``{"prompt": ..., "output_tokens": N}``, the shape ``records.read_records`` accepts, plus
what the caller knows of the rest: ``id`` (the record's, for collected prompts), ``finish_reason``
(``stop`` or ``length``: a ``length`` label is a lower bound), ``model`` (whose lengths these are),
``tokenizer`` (``ServedModel.tokenizer_sha256``: whose tokens they are counted in) and ``seed``.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path


class TrafficLog:
    """Appends one JSON line per finished request; safe to share between threads of one process."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def append(
        self,
        prompt: str,
        output_tokens: int,
        record_id: str | None = None,
        finish_reason: str | None = None,
        model: str | None = None,
        tokenizer: str | None = None,
        seed: int | None = None,
    ) -> None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt: must be a non-empty string")
        if isinstance(output_tokens, bool) or not isinstance(output_tokens, int) or output_tokens < 0:
            raise ValueError(f"output_tokens: must be an integer >= 0, got {output_tokens!r}")
        if finish_reason not in (None, "stop", "length", "abort"):
            raise ValueError(f"finish_reason: must be stop, length or abort, got {finish_reason!r}")
        record = {"id": record_id, "prompt": prompt, "output_tokens": output_tokens}
        record |= {"finish_reason": finish_reason, "model": model, "tokenizer": tokenizer, "seed": seed}
        record = {k: v for k, v in record.items() if v is not None}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        # One write of a whole line under a lock: concurrent requests never interleave their records.
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write(line)
