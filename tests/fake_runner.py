"""A runner that stands in for the model when the scheduler is what is tested.

It keeps a fake paged "KV cache" that stores token ids at their slots (block id * block size +
offset), and samples a token that is a function of the whole prefix read back through the block
table. So a wrong block table, a lost write or a bad recompute after preemption changes the tokens.

``depth`` plans may be in flight, as in a pipeline of that many stages: each is computed only when it
is collected, so the engine schedules the next plans before the earlier ones' tokens are back.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

from pipeline.plan import ScheduledChunk, StepOutput, StepPlan


class FakeRunner:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        vocab_size: int = 1000,
        depth: int = 1,
        probe: Callable[[ScheduledChunk], int | None] | None = None,
    ) -> None:
        """``probe``: a stand-in length probe, the refined whole-output length for a sampled chunk."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.depth = depth
        self.probe = probe
        self.slots: dict[int, int] = {}
        self.plans: list[StepPlan] = []
        self._pending: collections.deque[StepPlan] = collections.deque()

    def submit(self, plan: StepPlan) -> None:
        assert len(self._pending) < self.depth, "more plans in flight than the runner's depth"
        self._pending.append(plan)

    def collect(self) -> StepOutput:
        return self.execute(self._pending.popleft())

    def _slot(self, block_ids: tuple[int, ...], pos: int) -> int:
        return block_ids[pos // self.block_size] * self.block_size + pos % self.block_size

    def execute(self, plan: StepPlan) -> StepOutput:
        self.plans.append(plan)
        sampled = []
        for chunk in plan.chunks:
            for i, token in enumerate(chunk.token_ids):
                self.slots[self._slot(chunk.block_ids, chunk.start_pos + i)] = token
            if chunk.sampling is not None:
                prefix = [self.slots[self._slot(chunk.block_ids, p)] for p in range(chunk.end_pos)]
                sampled.append(next_token(prefix, self.vocab_size))
        if self.probe is None:
            return StepOutput(plan.step_id, tuple(sampled))
        refined = tuple(self.probe(chunk) for chunk in plan.sampling_chunks)
        return StepOutput(plan.step_id, tuple(sampled), refined)


def next_token(prefix: list[int], vocab_size: int) -> int:
    """The fake model: a deterministic function of the whole prefix."""
    h = 17
    for t in prefix:
        h = (h * 31 + t) % 1_000_003
    return h % vocab_size


class Clock:
    """Virtual time for the scheduler's tests: ``now_s`` moves only when a test moves it."""

    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s
