"""Token sampling: penalties, then greedy or temperature / top-k / top-p, with reproducible per-request seeds."""

from __future__ import annotations

import torch

from pipeline.plan import ScheduledChunk


def _generator(seed: int, output_index: int, device: torch.device) -> torch.Generator:
    # Seeded by (seed, which output token): the draw does not depend on the batch the request shares
    # or on preemptions, so a seeded request always yields the same text.
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + output_index) % 2**63)


NUCLEUS_SEARCH_WIDTH = 256
"""Top-p first looks for its nucleus among this many best tokens and sorts the whole vocabulary only
when the nucleus is wider (a sort of 49k logits per request per step cost as much as SmolLM2's forward)."""


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (V,) logits outside the top-k and the top-p nucleus with -inf."""
    vocab = logits.shape[-1]
    keep = top_k if 0 < top_k < vocab else vocab
    if top_p >= 1.0:
        if keep == vocab:
            return logits
        kth = torch.topk(logits, keep).values[-1]
        return logits.masked_fill(logits < kth, float("-inf"))
    # The nucleus renormalises over the top-k tokens (all of them when top_k is off).
    total = torch.logsumexp(logits if keep == vocab else torch.topk(logits, keep).values, -1)
    width = min(keep, NUCLEUS_SEARCH_WIDTH)
    while True:
        values, order = torch.topk(logits, width)
        probs = (values - total).exp()
        cumulative = probs.cumsum(-1)
        if width == keep or cumulative[-1] >= top_p:
            break
        width = keep  # the nucleus is wider than the search: rank every kept token
    # Keep a token while the tokens ranked above it have not yet reached top_p (the top one always stays).
    kept = order[(cumulative - probs) < top_p]
    return torch.full_like(logits, float("-inf")).index_copy_(0, kept, logits[kept])


def penalize(logits: torch.Tensor, chunk: ScheduledChunk) -> torch.Tensor:
    """Apply a request's penalties to its (V,) logits, as its logits processors would."""
    params = chunk.sampling
    assert params is not None
    history = torch.tensor(chunk.history_token_ids, dtype=torch.long, device=logits.device)
    if params.repetition_penalty != 1.0:
        # transformers' RepetitionPenaltyLogitsProcessor: every token seen, prompt included, once.
        seen = logits.gather(0, history)
        seen = torch.where(seen < 0, seen * params.repetition_penalty, seen / params.repetition_penalty)
        logits = logits.scatter(0, history, seen)
    if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
        # OpenAI's: output tokens only; frequency per occurrence, presence once.
        output = history[chunk.num_prompt_tokens :]
        counts = torch.zeros_like(logits).scatter_add_(0, output, torch.ones_like(output, dtype=logits.dtype))
        logits = (
            logits
            - params.frequency_penalty * counts
            - params.presence_penalty * (counts > 0).to(logits.dtype)
        )
    return logits


def sample(logits: torch.Tensor, chunks: tuple[ScheduledChunk, ...]) -> list[int]:
    """logits (N, V) float32, one row per sampling chunk -> one token id per row."""
    penalized = [row for row, chunk in enumerate(chunks) if chunk.sampling and chunk.sampling.has_penalties]
    if penalized:
        logits = logits.clone()
        for row in penalized:
            logits[row] = penalize(logits[row], chunks[row])
    tokens = logits.argmax(-1).tolist()
    for row, chunk in enumerate(chunks):
        params = chunk.sampling
        if params is None or params.is_greedy:
            continue
        row_logits = _filter(logits[row] / params.temperature, params.top_k, params.top_p)
        probs = row_logits.softmax(-1)
        generator = None
        if params.seed is not None:
            generator = _generator(params.seed, chunk.output_index, logits.device)
        tokens[row] = int(torch.multinomial(probs, 1, generator=generator))
    return tokens
