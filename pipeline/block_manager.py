"""Bookkeeping for the paged KV pool: which blocks are free, which each request holds, and which hold a
reusable prefix (automatic prefix caching, as vLLM v1's ``KVCacheManager`` / ``BlockPool``).

Pure Python; the tensors live in the workers, which only ever see block ids through a step's plan.

Prefix caching is block naming:

- A full block's *name* is a hash of its parent block's name and its own token ids, so equal names mean
  equal prefixes up to and including the block. A block is named once the step that writes its KV has
  come back (``name_full_blocks``): with a pipeline, a later plan never reads a block still being written.
- Blocks are reference-counted. A new or resumed request takes the named blocks of its longest cached
  prefix (``cached_prefix`` then ``take``), sharing them with whoever holds them; it always computes at
  least its last token itself, so there are logits to sample and a shared block is never written.
- A freed block keeps its name: it waits in an LRU list of cached free blocks, and is evicted (its name
  dropped) only when a block is needed and no unnamed free block is left; a block in use is never evicted.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

from pipeline.request import Request

BlockName = int
"""``hash((parent name, token ids))``: deterministic across processes for ints (unlike str hashes), a
signed 64-bit integer."""

_ROOT_NAME: BlockName = 0  # the parent of a sequence's first block (hash(None) varies by process)


def extend_block_names(
    names: list[BlockName], token_ids: Sequence[int], block_size: int, num_blocks: int
) -> list[BlockName]:
    """Name the full blocks of ``token_ids`` up to ``num_blocks``, appending to ``names`` (the names of its
    first ``len(names)`` blocks) and returning it. The one definition of a block's name: the engine names
    its blocks with it, and the ingress names a prompt's blocks with it to route by cached prefix."""
    for i in range(len(names), num_blocks):
        parent = names[-1] if names else _ROOT_NAME
        names.append(hash((parent, tuple(token_ids[i * block_size : (i + 1) * block_size]))))
    return names


def num_cacheable_blocks(num_tokens: int, block_size: int) -> int:
    """Full blocks of a sequence that a cache hit may cover: at least its last token is always computed."""
    return (num_tokens - 1) // block_size


def prompt_block_names(token_ids: Sequence[int], block_size: int) -> tuple[BlockName, ...]:
    """The names of the prompt blocks a cache could hold for this prompt (``cached_prefix`` looks them up)."""
    num_blocks = num_cacheable_blocks(len(token_ids), block_size)
    return tuple(extend_block_names([], token_ids, block_size, num_blocks))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Unnamed free blocks, a stack: recently freed blocks are reused first, which keeps the working
        # set warm in caches. Named free blocks wait in LRU order (least recently freed first) for reuse.
        self._free_block_ids: list[int] = list(range(num_blocks - 1, -1, -1))
        self._cached_free_block_ids: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._ref_counts = [0] * num_blocks
        self._name_of_block: dict[int, BlockName] = {}
        self._block_of_name: dict[BlockName, int] = {}
        # Per request (by id, while it is unfinished): the names of its full blocks computed so far, and
        # how many of its held blocks are known named (its cache hit, then the blocks it named itself).
        self._names: dict[str, list[BlockName]] = {}
        self._num_named_held: dict[str, int] = {}
        self.num_queried_tokens = 0
        """Tokens of first-admitted requests looked up in the cache (the hit rate's denominator)."""
        self.num_hit_tokens = 0
        """Of those, tokens found cached (their KV was not computed again)."""
        self.num_evicted_blocks = 0
        """Named blocks whose name was dropped to reuse them."""

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (cached ones included: they are evicted on demand)."""
        return len(self._free_block_ids) + len(self._cached_free_block_ids)

    @property
    def num_cached_blocks(self) -> int:
        """Named blocks, in use or free: what a new request could hit."""
        return len(self._block_of_name)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def free_block_ids(self) -> frozenset[int]:
        """Every free block, named or not (for checks; the hot path never builds it)."""
        return frozenset(self._free_block_ids) | frozenset(self._cached_free_block_ids)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def is_named(self, block_id: int) -> bool:
        return block_id in self._name_of_block

    # ---- growth and release -----------------------------------------------------------------------

    def num_missing_blocks(self, request: Request, num_tokens: int) -> int:
        """Blocks ``request`` still needs to hold ``num_tokens`` positions."""
        num_needed = -(-num_tokens // self.block_size)
        return max(0, num_needed - len(request.block_ids))

    def can_grow(self, request: Request, num_tokens: int, num_reserved_blocks: int = 0) -> bool:
        missing = self.num_missing_blocks(request, num_tokens)
        return missing == 0 or missing <= self.num_free_blocks - num_reserved_blocks

    def grow(self, request: Request, num_tokens: int) -> None:
        """Give ``request`` enough blocks for ``num_tokens`` positions; the caller checked ``can_grow``."""
        for _ in range(self.num_missing_blocks(request, num_tokens)):
            request.block_ids.append(self._allocate())

    def _allocate(self) -> int:
        if self._free_block_ids:
            block_id = self._free_block_ids.pop()
        else:  # evict the least recently freed named block
            block_id, _ = self._cached_free_block_ids.popitem(last=False)
            del self._block_of_name[self._name_of_block.pop(block_id)]
            self.num_evicted_blocks += 1
        assert self._ref_counts[block_id] == 0, f"block {block_id} is in use"
        self._ref_counts[block_id] = 1
        return block_id

    def free(self, request: Request) -> None:
        """Drop the request's hold on its blocks (finished, aborted or preempted). Blocks no one else
        holds become free; named ones stay cached, the request's last blocks first in line for eviction."""
        for block_id in reversed(request.block_ids):
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] > 0:
                continue
            if block_id in self._name_of_block:
                self._cached_free_block_ids[block_id] = None
            else:
                self._free_block_ids.append(block_id)
        request.block_ids = []
        self._num_named_held.pop(request.request_id, None)

    def forget(self, request: Request) -> None:
        """The request finished: drop its names (its blocks were freed)."""
        self._names.pop(request.request_id, None)

    # ---- prefix caching ---------------------------------------------------------------------------

    def _names_of(self, request: Request, num_blocks: int) -> list[BlockName]:
        """The names of the request's first ``num_blocks`` full blocks (computed once, then extended)."""
        names = self._names.setdefault(request.request_id, [])
        return extend_block_names(names, request.token_ids, self.block_size, num_blocks)

    def cached_prefix(self, request: Request) -> list[int]:
        """Block ids of the longest cached prefix of the request's tokens, leaving at least its last token
        to compute (so a shared block is never written); empty with caching off. Changes nothing."""
        if not self.enable_prefix_caching:
            return []
        hit: list[int] = []
        for name in self._names_of(request, num_cacheable_blocks(request.num_tokens, self.block_size)):
            block_id = self._block_of_name.get(name)
            if block_id is None:
                break
            hit.append(block_id)
        return hit

    def cached_block_names(self, max_names: int) -> list[BlockName]:
        """The names of cached blocks, at most ``max_names``: those in use first, then free ones from the
        most recently freed (the last to be evicted). What a replica reports to the routers. Safe to call
        from another thread than the engine's: it reads copies (each made in one step under the GIL)."""
        name_of_block = dict(self._name_of_block)
        free = list(self._cached_free_block_ids)
        free_set = set(free)
        in_use = [name for block_id, name in name_of_block.items() if block_id not in free_set]
        recent_free = [name_of_block[b] for b in reversed(free) if b in name_of_block]
        return (in_use + recent_free)[:max_names]

    def num_taken_from_free(self, block_ids: list[int]) -> int:
        """How many of these blocks no one holds: taking them shrinks the free pool."""
        return sum(1 for b in block_ids if self._ref_counts[b] == 0)

    def take(self, request: Request, cached_block_ids: list[int]) -> None:
        """Give a request that holds no blocks the cached prefix ``cached_prefix`` found, and count it."""
        assert not request.block_ids, "a cached prefix is taken only by a request holding no blocks"
        for block_id in cached_block_ids:
            if self._ref_counts[block_id] == 0:
                del self._cached_free_block_ids[block_id]
            self._ref_counts[block_id] += 1
        request.block_ids = list(cached_block_ids)
        self._num_named_held[request.request_id] = len(cached_block_ids)

    def count_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.num_queried_tokens += num_tokens
        self.num_hit_tokens += num_hit_tokens

    def name_full_blocks(self, request: Request, num_written_tokens: int) -> None:
        """The KV of the request's first ``num_written_tokens`` positions is written: name its full blocks
        so later requests can share them. A block whose name another block already has stays unnamed."""
        if not self.enable_prefix_caching:
            return
        num_full = num_written_tokens // self.block_size
        first = self._num_named_held.get(request.request_id, 0)
        if num_full <= first:
            return
        names = self._names_of(request, num_full)
        for i in range(first, num_full):
            block_id = request.block_ids[i]
            if names[i] not in self._block_of_name and block_id not in self._name_of_block:
                self._block_of_name[names[i]] = block_id
                self._name_of_block[block_id] = names[i]
        self._num_named_held[request.request_id] = num_full
