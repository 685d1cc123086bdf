"""Prefix caching's bookkeeping, exactly: block naming, sharing, LRU eviction, and what the scheduler
counts (only uncached tokens in the budget, the reservation and the predicted work). Pure Python."""

from __future__ import annotations

from pipeline.block_manager import BlockManager
from pipeline.config import SchedulerConfig
from pipeline.engine import Engine
from pipeline.request import NewRequest, Request, SamplingParams
from pipeline.scheduler import Scheduler
from tests.fake_runner import FakeRunner


def request(request_id: str, token_ids: list[int]) -> Request:
    return Request(request_id, token_ids, SamplingParams(), arrival_s=0.0)


def hold(blocks: BlockManager, r: Request) -> None:
    """Admit ``r`` as the scheduler does: take its cached prefix, grow, write, name."""
    blocks.take(r, blocks.cached_prefix(r))
    blocks.grow(r, r.num_tokens)
    blocks.name_full_blocks(r, r.num_tokens)


def test_a_full_block_is_shared_only_once_named_and_never_the_last_token() -> None:
    blocks = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = request("a", list(range(10)))  # blocks [0..3] [4..7] and a partial [8, 9]
    blocks.grow(a, 10)
    assert blocks.cached_prefix(request("b", list(range(10)))) == []  # written, but not yet named
    blocks.name_full_blocks(a, 10)
    assert blocks.num_cached_blocks == 2
    assert blocks.cached_prefix(request("b", list(range(12)))) == a.block_ids[:2]
    # 8 tokens: both blocks are cached, but the last token is computed again, so only the first is hit.
    assert blocks.cached_prefix(request("c", list(range(8)))) == a.block_ids[:1]
    assert blocks.cached_prefix(request("d", [0, 1, 2, 9, 4, 5, 6, 7, 8])) == []  # a different first block
    assert blocks.cached_prefix(request("e", [*range(4), 0, 0, 0, 0, 8])) == a.block_ids[:1]


def test_shared_blocks_are_counted_and_free_blocks_keep_their_names_until_evicted() -> None:
    blocks = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a, b = request("a", [1, 2, 3, 4, 5]), request("b", [1, 2, 3, 4, 6])
    hold(blocks, a)  # 3 blocks, the first two named
    hold(blocks, b)  # shares them, and a third of its own
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    first, second = a.block_ids[:2]
    assert blocks.ref_count(first) == blocks.ref_count(second) == 2
    assert blocks.num_free_blocks == 0
    blocks.free(a)
    assert [blocks.ref_count(i) for i in b.block_ids] == [1, 1, 1] and blocks.num_free_blocks == 1
    blocks.free(b)
    assert blocks.num_free_blocks == 4 and blocks.num_cached_blocks == 2  # named blocks stay cached
    # A new sequence takes the two unnamed free blocks first, then evicts the least recently freed named
    # one: b freed its last block first, so the second named block goes before the first.
    c = request("c", [9, 9, 9, 9, 9, 9, 9])
    blocks.grow(c, 6)
    assert blocks.num_evicted_blocks == 1 and c.block_ids[-1] == second
    assert blocks.cached_prefix(request("d", [1, 2, 3, 4, 5])) == [first]
    blocks.grow(c, 7)
    assert c.block_ids[-1] == first and blocks.num_evicted_blocks == 2 and blocks.num_cached_blocks == 0


def test_a_block_whose_prefix_is_already_named_stays_unnamed() -> None:
    blocks = BlockManager(num_blocks=6, block_size=2, enable_prefix_caching=True)
    a, b = request("a", [1, 2, 3]), request("b", [1, 2, 3])
    blocks.grow(a, 3)
    blocks.grow(b, 3)  # both computed the same block before either was named
    blocks.name_full_blocks(a, 3)
    blocks.name_full_blocks(b, 3)
    assert blocks.is_named(a.block_ids[0]) and not blocks.is_named(b.block_ids[0])
    blocks.free(b)
    assert blocks.num_cached_blocks == 1 and blocks.num_free_blocks == 4


def test_caching_off_names_nothing() -> None:
    blocks = BlockManager(num_blocks=4, block_size=2)
    a = request("a", [1, 2, 3, 4, 5])
    hold(blocks, a)
    assert blocks.num_cached_blocks == 0 and blocks.cached_prefix(request("b", [1, 2, 3, 4, 5])) == []


def test_the_budget_reservation_and_predicted_work_count_only_uncached_tokens() -> None:
    scheduler = Scheduler(
        SchedulerConfig(chunk_size=8), 16, 4, 128, eos_token_ids=(), enable_prefix_caching=True
    )
    engine = Engine(FakeRunner(16, 4), scheduler)
    prompt = tuple(range(1, 31))  # 30 tokens: 7 full blocks
    engine.add_request(NewRequest("a", prompt, SamplingParams(max_tokens=2), predicted_output_tokens=2))
    while engine.has_unfinished:
        engine.step()
    assert scheduler.block_manager.num_cached_blocks == 7 and scheduler.block_manager.num_free_blocks == 16
    b = engine.add_request(NewRequest("b", (*prompt, 31, 32, 33), SamplingParams(max_tokens=2), 2))
    assert b.num_cached_tokens == 28 and b.predicted_work_tokens == 33 - 28 + 2  # estimated on arrival
    plan = engine.schedule()
    [chunk] = plan.chunks
    assert (chunk.start_pos, chunk.num_tokens, plan.num_tokens) == (28, 5, 5)  # one step, not five
    assert chunk.sampling is not None and b.num_cached_tokens == 28 and b.predicted_work_tokens == 2
    # The reservation: 7 cached blocks taken off the free list and 2 new ones, 9 of 16 (not 7 + 9).
    assert scheduler.block_manager.num_free_blocks == 16 - 9
    assert scheduler.block_manager.num_queried_tokens == 30 + 33
    assert scheduler.block_manager.num_hit_tokens == 28
    outputs = engine.complete(plan, engine.runner.execute(plan))
    assert outputs[0].num_cached_tokens == 28
