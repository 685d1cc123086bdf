"""One SmolLM2 decoder layer's linear layers against its prefill attention, per FLOP, on this CPU (one thread):
why turn 6 of the conversation probe costs more than its FLOPs say (docs/ROUTING.md, "One conversation,
turn by turn").

    python -m bench.attention_cost

Random weights of SmolLM2-135M's shapes (hidden 576, MLP 1,536, 9 query heads over 3 KV heads of 64); the
attention is the engine's own prefill path (``workers.attention.paged_attention``: the chunk's KV written to
a paged cache, the prefix gathered, one SDPA call), for 128-token chunks after the cached prefixes of turn 2
(64 tokens) and turn 6 (1,168 and 1,296) of ``Cli4yXC_0``. Medians of 30 calls each. Prints milliseconds and
GFLOP/s; writes nothing.
"""

from __future__ import annotations

import statistics
import time

import torch

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 576, 1536, 9, 3, 64
BLOCK = 16
CHUNKS = (("turn 2", 128, 64), ("turn 6, first chunk", 128, 1168), ("turn 6, second chunk", 128, 1296))


def median_s(fn, calls: int = 30) -> float:  # noqa: ANN001 (a zero-argument callable)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    from pipeline.plan import ScheduledChunk, StepPlan
    from workers.attention import AttentionMetadata, paged_attention

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    shapes = [(HIDDEN, HIDDEN), (HIDDEN, 192), (HIDDEN, 192), (HIDDEN, HIDDEN)] + [(HIDDEN, INTERMEDIATE)] * 2
    weights = [torch.randn(*s, generator=gen) / 30 for s in [*shapes, (INTERMEDIATE, HIDDEN)]]
    layer_params = sum(w.numel() for w in weights)

    def linears(x: torch.Tensor) -> torch.Tensor:
        """The q, k, v and output projections and the MLP: every GEMM of a layer but attention's."""
        projected = [x @ w for w in weights[:3]]
        projected[0] @ weights[3]
        return (torch.nn.functional.silu(x @ weights[4]) * (x @ weights[5])) @ weights[6]

    for name, new, cached in CHUNKS:
        kv_len = cached + new
        x = torch.randn(new, HIDDEN, generator=gen)
        query = torch.randn(new, HEADS, HEAD_DIM, generator=gen)
        keys, values = torch.randn(2, new, KV_HEADS, HEAD_DIM, generator=gen)
        blocks = tuple(range(-(-kv_len // BLOCK)))
        cache = torch.randn(2, KV_HEADS, len(blocks), BLOCK, HEAD_DIM, generator=gen)  # the prefix's KV
        chunk = ScheduledChunk("r", (0,) * new, cached, blocks, None, 0)
        meta = AttentionMetadata.build(StepPlan(0, (chunk,)), BLOCK, None, cache.device)
        linear_s = median_s(lambda x=x: linears(x))
        attention_s = median_s(
            lambda q=query, k=keys, v=values, c=cache, m=meta: paged_attention(q, k, v, c, m, 0.125)
        )
        linear_flops = 2 * new * layer_params
        attention_flops = 4 * new * (cached + (new + 1) / 2) * HEADS * HEAD_DIM
        print(
            f"{name} ({new} tokens after {cached}): linear layers {linear_s * 1e3:.2f} ms "
            f"({linear_flops / linear_s / 1e9:.0f} GFLOP/s), attention {attention_s * 1e3:.2f} ms "
            f"({attention_flops / attention_s / 1e9:.0f} GFLOP/s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
