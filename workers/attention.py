"""Paged attention for one flattened mixed batch of decode tokens and prefill chunks.

The batch is one sequence of ``T`` tokens: first ``num_decodes`` single-token decodes, then prefill
chunks. Keys and values of the step's tokens are written into the paged cache first; then

- all decodes attend together: one SDPA call over their block tables gathered to ``(N, Hkv, L, D)``
  with a padding mask, so a decode-heavy SARATHI batch costs one kernel, not one per request;
- each prefill chunk attends to its request's cached prefix plus itself, causally (one call per chunk;
  decode-maximal batches have at most a few). A chunk that starts at position 0 needs no gather: it
  attends to its own fresh keys. On CPU a chunk is attended with two batched matmuls and an additive
  mask made once per step (in slices of query rows, so its scores stay under 64 MB): SDPA's CPU kernel
  runs a 128-token chunk over a 1,456-token prefix in about 21 ms a layer here, the matmuls in about
  10 ms, and 422 tokens over 1,750 in 73 ms against 40 (SmolLM2's 9 query heads over 3 KV heads, head
  size 64; one thread). SDPA keeps chunks whose mask alone would pass 64 MB, and every chunk on an
  accelerator.

Cache layout per layer: ``(2, Hkv, num_blocks, block_size, D)``, keys then values. Heads outermost
means a gathered block table is ``(Hkv, N, L, D)`` with each head's ``(L, D)`` matrix contiguous,
which SDPA on CPU runs about 2.5x faster than the strided view a ``(B, S, Hkv, D)`` layout gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.plan import ScheduledChunk, StepPlan


@dataclass(frozen=True)
class PrefillChunk:
    token_start: int  # offset of the chunk's first token in the flattened batch
    token_end: int
    start_pos: int  # its first token's position in the request
    block_table: torch.Tensor  # (num_blocks,) long: covers positions [0, start_pos + q_len)
    mask: torch.Tensor | None  # (q_len, kv_len) bool; None means plain causal over fresh keys
    bias: torch.Tensor | None = None  # (q_len, kv_len) float32, 0 or -inf: set where matmuls attend it


@dataclass(frozen=True)
class DecodeGroup:
    """Decodes of similar context length, attended in one SDPA call."""

    rows: torch.Tensor | None  # (n,) long: their rows among the step's first ``num_decodes`` tokens;
    # None when the group is all of them in order (a single group), so no select or scatter is needed
    block_tables: torch.Tensor  # (n, max_blocks) long, padded with block 0
    mask: torch.Tensor  # (n, 1, 1, max_blocks * block_size) float: 0 for real (in-window) keys, else -inf


# Decodes are split into up to this many groups by context length, so a short request is not padded
# to the longest one's length: for evenly spread lengths, 4 groups cut the gathered KV by about 37%.
_MAX_DECODE_GROUPS = 4
_MIN_DECODES_PER_GROUP = 8

# On CPU a prefill chunk with at most this many query x key positions is attended with matmuls, in
# slices of query rows whose scores (every head's) hold at most as many floats; SDPA takes the rest.
_MAX_MATMUL_SCORES = 2**24


def _decode_groups(
    decodes: list[ScheduledChunk], block_size: int, sliding_window: int | None, device: torch.device
) -> tuple[DecodeGroup, ...]:
    num_groups = max(1, min(_MAX_DECODE_GROUPS, len(decodes) // _MIN_DECODES_PER_GROUP))
    order = list(range(len(decodes)))
    if num_groups > 1:
        order.sort(key=lambda i: decodes[i].end_pos)
    groups = []
    for g in range(num_groups):
        rows = order[g * len(order) // num_groups : (g + 1) * len(order) // num_groups]
        lens = [decodes[i].end_pos for i in rows]
        max_blocks = -(-max(lens) // block_size)
        used = [decodes[i].block_ids[: -(-n // block_size)] for i, n in zip(rows, lens, strict=True)]
        # One tensor from padded lists: a torch.tensor call per request would cost more than its row.
        tables = torch.tensor([list(ids) + [0] * (max_blocks - len(ids)) for ids in used], dtype=torch.long)
        key_pos = torch.arange(max_blocks * block_size)
        lens_t = torch.tensor(lens)[:, None]
        keep = key_pos[None, :] < lens_t  # (n, L)
        if sliding_window is not None:
            keep &= key_pos[None, :] > (lens_t - 1 - sliding_window)
        # The additive float mask SDPA would derive from a boolean one in every layer's call, made once.
        mask = torch.zeros(keep.shape).masked_fill_(~keep, float("-inf"))
        groups.append(
            DecodeGroup(
                None if num_groups == 1 else torch.tensor(rows, device=device),
                tables.to(device),
                mask[:, None, None, :].to(device),
            )
        )
    return tuple(groups)


@dataclass(frozen=True)
class AttentionMetadata:
    """Per-step tensors shared by every layer of a stage."""

    positions: torch.Tensor  # (T,) long
    slot_mapping: torch.Tensor  # (T,) long: block_id * block_size + offset for each token's KV
    num_decodes: int
    decode_groups: tuple[DecodeGroup, ...]
    prefills: tuple[PrefillChunk, ...]

    @classmethod
    def build(
        cls, plan: StepPlan, block_size: int, sliding_window: int | None, device: torch.device
    ) -> AttentionMetadata:
        positions: list[int] = []
        slots: list[int] = []
        for chunk in plan.chunks:
            for pos in range(chunk.start_pos, chunk.end_pos):
                positions.append(pos)
                slots.append(chunk.block_ids[pos // block_size] * block_size + pos % block_size)

        decodes = [c for c in plan.chunks if c.is_decode]
        decode_groups = _decode_groups(decodes, block_size, sliding_window, device) if decodes else ()

        prefills = []
        offset = len(decodes)
        for c in plan.chunks[len(decodes) :]:
            q_len, kv_len = c.num_tokens, c.end_pos
            mask = bias = None
            use_matmul = device.type == "cpu" and q_len * kv_len <= _MAX_MATMUL_SCORES
            needs_mask = c.start_pos > 0 or (sliding_window is not None and kv_len > sliding_window)
            if needs_mask or use_matmul:
                q_pos = torch.arange(c.start_pos, kv_len)[:, None]
                k_pos = torch.arange(kv_len)[None, :]
                mask = k_pos <= q_pos
                if sliding_window is not None:
                    mask &= k_pos > q_pos - sliding_window
                if use_matmul:
                    bias = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
                mask = mask.to(device) if needs_mask else None
            table = torch.tensor(c.block_ids[: -(-kv_len // block_size)], dtype=torch.long, device=device)
            prefills.append(PrefillChunk(offset, offset + q_len, c.start_pos, table, mask, bias))
            offset += q_len
        return cls(
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            num_decodes=len(decodes),
            decode_groups=decode_groups,
            prefills=tuple(prefills),
        )


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store the step's keys and values (T, Hkv, D) at their slots in ``cache`` (2, Hkv, B, S, D)."""
    heads, _, _, dim = cache[0].shape
    cache[0].view(heads, -1, dim).index_copy_(1, slot_mapping, k.transpose(0, 1))
    cache[1].view(heads, -1, dim).index_copy_(1, slot_mapping, v.transpose(0, 1))


def _gather(cache: torch.Tensor, block_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the blocks ``block_table`` (nb,) or (N, nb) picks from ``cache`` (2, Hkv, B, S, D):
    each (Hkv, nb*S, D) or (N, Hkv, nb*S, D).

    One ``index_select`` fetches keys and values together (on the flattened table: about twice as fast
    on CPU as advanced indexing)."""
    _, heads, num_blocks, size, dim = cache.shape
    blocks = cache.view(2 * heads, num_blocks, size, dim).index_select(1, block_table.reshape(-1))
    if block_table.dim() == 1:
        kv = blocks.view(2, heads, -1, dim)
    else:
        kv = blocks.view(2, heads, block_table.shape[0], -1, dim).transpose(1, 2)
    return kv[0], kv[1]


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q (T, H, D), k/v (T, Hkv, D) of the step's tokens -> attention output (T, H, D)."""
    write_kv(cache, k, v, meta.slot_mapping)
    out = torch.empty_like(q)
    num_kv_heads, head_dim = cache.shape[1], q.shape[-1]
    for group in meta.decode_groups:
        n = group.block_tables.shape[0]
        keys, values = _gather(cache, group.block_tables)  # (n, Hkv, L, D) each
        # Grouped-query trick: the G query heads that share a KV head act as G queries of length one,
        # so keys and values are never repeated per query head.
        query = q[:n] if group.rows is None else q.index_select(0, group.rows)
        query = query.view(n, num_kv_heads, -1, head_dim)  # (n, Hkv, G, D)
        mask = group.mask.to(q.dtype)  # SDPA takes a float mask only in the query's dtype
        attn = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)
        if group.rows is None:
            out[:n] = attn.view(n, -1, head_dim)
        else:
            out.index_copy_(0, group.rows, attn.reshape(n, -1, head_dim))
    for chunk in meta.prefills:
        query = q[chunk.token_start : chunk.token_end].transpose(0, 1)  # (H, q, D)
        if chunk.start_pos == 0:  # its own fresh keys are all it attends to
            keys = k[chunk.token_start : chunk.token_end].transpose(0, 1)  # (Hkv, q, D)
            values = v[chunk.token_start : chunk.token_end].transpose(0, 1)
        else:
            kv_len = chunk.token_end - chunk.token_start + chunk.start_pos
            keys, values = _gather(cache, chunk.block_table)  # (Hkv, nb*S, D) each
            keys, values = keys[:, :kv_len], values[:, :kv_len]
        if chunk.bias is not None and q.dtype == torch.float32:
            attn = _matmul_attention(query, keys, values, chunk.bias, scale)
        elif chunk.mask is None:
            attn = F.scaled_dot_product_attention(
                query, keys, values, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            attn = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=chunk.mask, scale=scale, enable_gqa=True
            )
        out[chunk.token_start : chunk.token_end] = attn.transpose(0, 1)
    return out


def _matmul_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of one chunk as two batched matmuls: query (H, q, D), keys and values (Hkv, kv, D),
    ``bias`` (q, kv) added to every head's scores -> (H, q, D). The G query heads sharing a KV head are
    stacked as G*q rows of one matmul, so keys and values are never repeated."""
    heads, q_len, dim = query.shape
    kv_heads, kv_len = keys.shape[0], keys.shape[1]
    rows = max(1, _MAX_MATMUL_SCORES // (heads * kv_len))
    if q_len > rows:  # query rows attend independently: slices bound the scores' memory
        out = torch.empty_like(query)
        for start in range(0, q_len, rows):
            end = start + rows
            out[:, start:end] = _matmul_attention(query[:, start:end], keys, values, bias[start:end], scale)
        return out
    group = heads // kv_heads
    scores = torch.matmul(query.reshape(kv_heads, group * q_len, dim), keys.transpose(1, 2))
    scores = scores.view(kv_heads, group, q_len, kv_len).mul_(scale).add_(bias)
    torch.softmax(scores, dim=-1, out=scores)
    return torch.matmul(scores.view(kv_heads, group * q_len, kv_len), values).view(heads, q_len, dim)
