"""Paged attention for one flattened mixed batch of decode tokens and prefill chunks.

The batch is one sequence of ``T`` tokens: first ``num_decodes`` single-token decodes, then prefill
chunks. Keys and values of the step's tokens are written into the paged cache first; then

- all decodes attend together: one SDPA call over their block tables gathered to ``(N, Hkv, L, D)``
  with a padding mask, so a decode-heavy SARATHI batch costs one kernel, not one per request;
- each prefill chunk attends to its request's cached prefix plus itself, causally (one SDPA call per
  chunk; decode-maximal batches have at most a few). A chunk that starts at position 0 needs no gather
  and no mask: it attends to its own fresh keys, causally. Every call is 4-D: SDPA's CPU kernel takes
  3-D inputs down its unfused path, 3x slower here (a 128-token chunk over a 1,296-token prefix: 20.4 ms
  a layer against 6.4, SmolLM2's 9 query heads over 3 KV heads, head size 64, one thread). On CPU the
  mask is the additive float one SDPA would derive from a boolean one in every layer, made once per step
  while it stays under 64 MB.

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
    mask: torch.Tensor | None  # (q_len, kv_len): bool, or float 0 / -inf; None means causal over fresh keys


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

# On CPU a prefill chunk's mask is made additive (float) once per step while it has at most this many
# query x key positions (64 MB); bigger ones stay boolean, a quarter the memory.
_MAX_FLOAT_MASK = 2**24


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
            mask = None
            if c.start_pos > 0 or (sliding_window is not None and kv_len > sliding_window):
                q_pos = torch.arange(c.start_pos, kv_len)[:, None]
                k_pos = torch.arange(kv_len)[None, :]
                mask = k_pos <= q_pos
                if sliding_window is not None:
                    mask &= k_pos > q_pos - sliding_window
                if device.type == "cpu" and q_len * kv_len <= _MAX_FLOAT_MASK:
                    mask = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
                mask = mask.to(device)
            table = torch.tensor(c.block_ids[: -(-kv_len // block_size)], dtype=torch.long, device=device)
            prefills.append(PrefillChunk(offset, offset + q_len, c.start_pos, table, mask))
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
        query = q[chunk.token_start : chunk.token_end].transpose(0, 1)[None]  # (1, H, q, D)
        if chunk.start_pos == 0:  # its own fresh keys are all it attends to
            keys = k[chunk.token_start : chunk.token_end].transpose(0, 1)  # (Hkv, q, D)
            values = v[chunk.token_start : chunk.token_end].transpose(0, 1)
        else:
            kv_len = chunk.token_end - chunk.token_start + chunk.start_pos
            keys, values = _gather(cache, chunk.block_table)  # (Hkv, nb*S, D) each
            keys, values = keys[:, :kv_len], values[:, :kv_len]
        mask = chunk.mask
        if mask is not None and mask.is_floating_point():
            mask = mask.to(q.dtype)  # SDPA takes a float mask only in the query's dtype
        attn = F.scaled_dot_product_attention(
            query,
            keys[None],
            values[None],
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=True,
        )
        out[chunk.token_start : chunk.token_end] = attn[0].transpose(0, 1)
    return out
