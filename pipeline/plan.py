"""The typed contract between the scheduler and the model workers: what one step computes and returns."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.request import SamplingParams


@dataclass(frozen=True)
class ScheduledChunk:
    """The next ``len(token_ids)`` tokens of one request's prefix, at positions ``start_pos...``.

    A prefill chunk has many tokens, a decode one. Attention reads the request's cached KV for
    positions ``< start_pos`` through ``block_ids`` and the chunk's own tokens causally; the chunk's KV
    is written into the same blocks.
    """

    request_id: str
    token_ids: tuple[int, ...]
    start_pos: int
    block_ids: tuple[int, ...]
    """Block table covering at least ``start_pos + len(token_ids)`` positions."""
    sampling: SamplingParams | None
    """Set when this chunk completes the prefix: its last position's logits pick the next token."""
    output_index: int
    """Which output token would be sampled (0 for the first); seeds per-request sampling."""
    is_decode: bool = False
    """The request's next step is one output token (``Request.is_decoding`` when planned). A one-token
    final prefill chunk is not a decode: it attends causally like any prefill chunk."""
    history_token_ids: tuple[int, ...] = ()
    """The request's tokens so far (prompt, then output), when its sampling has penalties; else empty."""
    num_prompt_tokens: int = 0
    """How many of ``history_token_ids`` are the prompt (penalties treat prompt and output differently)."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True)
class StepPlan:
    """One iteration (or one pipeline micro-batch): decodes first, then prefill chunks."""

    step_id: int
    chunks: tuple[ScheduledChunk, ...]
    preempted_ids: tuple[str, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_decode_tokens(self) -> int:
        return sum(1 for c in self.chunks if c.is_decode)

    @property
    def num_prefill_tokens(self) -> int:
        return self.num_tokens - self.num_decode_tokens

    @property
    def sampling_chunks(self) -> tuple[ScheduledChunk, ...]:
        return tuple(c for c in self.chunks if c.sampling is not None)


@dataclass(frozen=True)
class StepOutput:
    """What the last pipeline stage returns for a plan."""

    step_id: int
    sampled_token_ids: tuple[int, ...]
    """One token per chunk of ``plan.sampling_chunks``, in that order."""
    refined_output_tokens: tuple[int | None, ...] = ()
    """With a length probe on the last stage: each sampled request's whole output length as predicted
    from its hidden state now, in the same order (None where the probe did not run); else empty."""
