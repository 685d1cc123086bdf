"""Bookkeeping for the paged KV pool: which blocks are free and which each request holds.

Pure Python; the tensors live in the workers, which only ever see block ids through a step's plan.
"""

from __future__ import annotations

from pipeline.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A stack: recently freed blocks are reused first, which keeps the working set warm in caches.
        self._free_block_ids: list[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_block_ids)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

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
            request.block_ids.append(self._free_block_ids.pop())

    def free(self, request: Request) -> None:
        self._free_block_ids.extend(reversed(request.block_ids))
        request.block_ids = []
