"""The sampler's top-k / top-p filter against a full sort of the vocabulary."""

from __future__ import annotations

import pytest
import torch

from workers.sampler import NUCLEUS_SEARCH_WIDTH, _filter


def full_sort_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The definition: mask outside the top-k, then sort everything and cut the nucleus (float64)."""
    logits = logits.double()
    if 0 < top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[-1], float("-inf"))
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = sorted_logits.softmax(-1)
    drop = (probs.cumsum(-1) - probs) >= top_p
    return logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))


@pytest.mark.parametrize("scale", [0.3, 5.0, 20.0])  # flat (nucleus wider than the search), peaked
@pytest.mark.parametrize("top_k", [0, 50, 2000])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 1.0])
def test_filter_keeps_the_same_tokens_as_a_full_sort(scale: float, top_k: int, top_p: float) -> None:
    generator = torch.Generator().manual_seed(7)
    for _ in range(20):
        logits = torch.randn(49_152, generator=generator) * scale
        kept = ~torch.isinf(_filter(logits, top_k, top_p))
        assert torch.equal(kept, ~torch.isinf(full_sort_filter(logits, top_k, top_p)))
        assert torch.equal(_filter(logits, top_k, top_p)[kept], logits[kept])


def test_a_flat_distribution_needs_the_full_sort() -> None:
    logits = torch.zeros(4 * NUCLEUS_SEARCH_WIDTH)
    assert int((~torch.isinf(_filter(logits, 0, 0.9))).sum()) == int(0.9 * logits.numel()) + 1
