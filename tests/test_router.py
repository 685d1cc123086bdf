"""The router: lengths to bins, bins to pools, and a pool's replica by predicted work. Pure Python, checked
exhaustively on small cases."""

from __future__ import annotations

import dataclasses
import random

import pytest

from cluster.predictor.lengths import equal_mass_boundaries
from cluster.router import (
    IMBALANCED_REQUESTS,
    BinRouter,
    PredictedWorkBook,
    PrefixPools,
    Route,
    decode_block_names,
    encode_block_names,
    least_cost,
    least_predicted_work,
    pools_for_bins,
    prefix_affinity,
)
from pipeline.block_manager import BlockManager, prompt_block_names
from pipeline.length_distribution import OutputLengthDistribution
from pipeline.request import NewRequest, Request, SamplingParams


@pytest.mark.parametrize("num_bins", range(1, 13))
def test_pools_take_contiguous_balanced_runs_of_bins(num_bins: int) -> None:
    for num_pools in range(1, num_bins + 1):
        pool_of_bin = pools_for_bins(num_bins, num_pools)
        assert len(pool_of_bin) == num_bins
        assert pool_of_bin[0] == 0 and pool_of_bin[-1] == num_pools - 1
        assert all(b - a in (0, 1) for a, b in zip(pool_of_bin, pool_of_bin[1:], strict=False))  # contiguous
        sizes = [pool_of_bin.count(p) for p in range(num_pools)]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_one_pool_per_bin_by_default() -> None:
    assert BinRouter.build([10, 20, 30]).pool_of_bin == (0, 1, 2, 3)
    assert BinRouter.build([]).pool_of_bin == (0,)  # one bin: everything goes to pool 0
    assert BinRouter.build([10, 20, 30], num_pools=2).pool_of_bin == (0, 0, 1, 1)
    assert BinRouter.build([10, 20, 30], num_pools=3).pool_of_bin == (0, 0, 1, 2)


@pytest.mark.parametrize(
    "boundaries", [[], [0], [5], [3, 9], [4, 4, 10], [1, 2, 3, 4, 5], [7, 7, 7], [0, 0, 20, 100]]
)
def test_every_length_lands_in_the_bin_the_predictor_would_name(boundaries: list[int]) -> None:
    router = BinRouter.build(boundaries)
    for length in range(0, (boundaries[-1] if boundaries else 0) + 5):
        bin_id = router.bin_of(length)
        # The bin is the number of edges strictly below the length: (edge[i-1], edge[i]] is bin i.
        assert bin_id == sum(edge < length for edge in boundaries)
        assert 0 <= bin_id < router.num_bins
        if bin_id > 0:
            assert boundaries[bin_id - 1] < length
        if bin_id < len(boundaries):
            assert length <= boundaries[bin_id]


def test_route_names_the_bin_and_its_pool() -> None:
    router = BinRouter.build([10, 20, 30], num_pools=2)
    expected = {
        0: Route(0, 0),
        10: Route(0, 0),
        11: Route(1, 0),
        20: Route(1, 0),
        21: Route(2, 1),
        31: Route(3, 1),
    }
    for length, route in expected.items():
        assert router.route(length) == route
    assert router.pool_of_bin == (0, 0, 1, 1)  # bins 0-1 on pool 0, bins 2-3 on pool 1
    assert router.num_bins == 4 and router.num_pools == 2


def test_equal_mass_bins_split_the_training_lengths_evenly() -> None:
    rng = random.Random(0)
    lengths = sorted(rng.sample(range(1, 100_000), 4000))  # distinct, so no ties blur the split
    for num_bins in (2, 3, 4, 8):
        router = BinRouter.build(equal_mass_boundaries(lengths, num_bins))
        counts = [0] * num_bins
        for length in lengths:
            counts[router.bin_of(length)] += 1
        assert max(counts) - min(counts) <= 2, counts


def test_bad_tables_are_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"bin_boundaries: must be non-decreasing, got \[5, 3\]"):
        BinRouter.build([5, 3])
    with pytest.raises(ValueError, match=r"bin_boundaries: must be non-negative integers"):
        BinRouter.build([-1, 3])
    with pytest.raises(ValueError, match=r"bin_boundaries: must be non-negative integers"):
        BinRouter.build([2.5])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"num_pools: must be in \[1, 3\] \(num_bins\), got 4"):
        BinRouter.build([1, 2], num_pools=4)
    with pytest.raises(ValueError, match=r"pool_of_bin: must name one pool per bin \(3\), got 2"):
        BinRouter((1, 2), (0, 1))
    with pytest.raises(ValueError, match=r"pool_of_bin: pools must be numbered 0 .. n-1"):
        BinRouter((1, 2), (0, 2, 2))
    with pytest.raises(ValueError, match=r"predicted_output_tokens: must be >= 0, got -1"):
        BinRouter.build([1]).route(-1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        BinRouter.build([1]).bin_boundaries = (2,)  # type: ignore[misc]


def test_router_and_autoscaling_policy_are_pure_python() -> None:
    import subprocess
    import sys

    code = (
        "import sys, cluster.router, cluster.autoscaling; print(sorted({'ray', 'torch'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- replica choice by predicted work ---------------------------------------------------------------


def test_the_replica_where_the_request_meets_the_least_predicted_work_is_chosen_first() -> None:
    book = PredictedWorkBook()
    book.report("a", work_tokens=[900], reported_at_s=10.0)  # one long request
    book.report("b", work_tokens=[40, 40, 40, 40, 40], reported_at_s=10.0)  # five short ones
    book.report("c", work_tokens=[300, 100], reported_at_s=10.0)
    # A long request meets every token of work ahead: least total work first (b 200, c 400, a 900).
    assert [book.delay_tokens(r, 1000) for r in "abc"] == [900, 200, 400]
    assert book.ranked(["a", "b", "c"], work_tokens=1000) == ["b", "c", "a"]
    # A short one shares steps only while it runs: a queue of five delays it more than one long request.
    assert [book.delay_tokens(r, 30) for r in "abc"] == [30, 150, 60]
    assert book.ranked(["a", "b", "c"], work_tokens=30) == ["a", "c", "b"]
    assert book.ranked(["a", "b", "c", "new"], work_tokens=30) == ["new", "a", "c", "b"]  # nothing known
    assert book.ranked(["x", "y"], work_tokens=30) == ["x", "y"]  # ties keep the caller's (shuffled) order


def test_requests_routed_since_the_last_report_count_until_a_later_report_or_their_completion() -> None:
    book = PredictedWorkBook()
    book.report("a", work_tokens=[500], reported_at_s=10.0)
    book.report("b", work_tokens=[600], reported_at_s=10.0)
    long = NewRequest("r1", (1,) * 20, SamplingParams(max_tokens=4096), predicted_output_tokens=380)
    assert long.predicted_work_tokens == 400  # prompt to prefill plus predicted output
    book.add("a", "r1", long.predicted_work_tokens, routed_at_s=10.2)
    assert book.outstanding("a") == [500, 400]
    assert book.ranked(["a", "b"], work_tokens=1000) == ["b", "a"]  # the stale report alone says "a"
    book.report("a", work_tokens=[500], reported_at_s=10.0)  # the same report again changes nothing
    assert book.outstanding("a") == [500, 400]
    book.report("a", work_tokens=[480, 395], reported_at_s=10.5)  # made after r1 was routed: counts it
    assert book.outstanding("a") == [480, 395]
    book.add("b", "r2", 300, routed_at_s=10.6)
    book.complete("b", "r2")  # finished before any report saw it
    assert book.outstanding("b") == [600]
    book.forget_all_but(["b"])
    assert book.outstanding("a") == [] and book.ranked(["b", "a"], work_tokens=10) == ["a", "b"]


def test_a_replica_reports_queued_prefill_plus_predicted_output_still_to_generate() -> None:
    new = NewRequest("r", (5,) * 30, SamplingParams(max_tokens=64), predicted_output_tokens=50)
    request = Request.of(new, arrival_s=0.0)
    assert request.predicted_work_tokens == new.predicted_work_tokens == 80
    request.num_computed_tokens = 30  # prefilled
    request.token_ids += [7] * 10  # ten tokens generated
    assert request.predicted_work_tokens == 40
    request.token_ids += [7] * 45  # outlived its prediction: still holds a slot
    assert request.predicted_work_tokens == 1
    no_prediction = NewRequest("q", (5,) * 3, SamplingParams(max_tokens=64))
    assert no_prediction.predicted_work_tokens == 67  # max_tokens stands in


def test_with_a_length_distribution_the_router_counts_the_expected_output_still_to_come() -> None:
    """A request that outlived its point prediction counts 1 token by the point, but by the predictor's
    error distribution it still has the mean excess to come; before it starts, the mean length counts."""
    spread = OutputLengthDistribution(levels=(0.0, 0.5, 1.0), ratios=(0.5, 1.0, 1.0), max_tokens=256)
    new = NewRequest(
        "r", (5,) * 30, SamplingParams(max_tokens=256), predicted_output_tokens=100, output_length_distribution=spread
    )
    mean = spread.expected_remaining_tokens(100, 0)  # lengths uniform on [50, 100], then [100, 256]
    assert mean == pytest.approx(0.5 * 75 + 0.5 * 178)
    assert new.expected_work_tokens == 30 + round(mean) and new.predicted_work_tokens == 130
    request = Request.of(new, arrival_s=0.0)
    request.num_computed_tokens = 30
    request.token_ids += [7] * 120  # past the point: 1 token by it, the distribution's excess by the mean
    assert request.predicted_work_tokens == 1
    assert request.expected_work_tokens == pytest.approx(spread.expected_remaining_tokens(100, 120))
    assert request.expected_work_tokens == pytest.approx((256 - 120) / 2)
    point_only = dataclasses.replace(new, output_length_distribution=None)
    assert point_only.expected_work_tokens == point_only.predicted_work_tokens == 130


# ---- replica choice by cached prefix and predicted work ---------------------------------------------


def chat_turn(request_id: str, prompt: list[int], predicted_output_tokens: int, block_size: int = 4):
    """A request as the ingress sends it: its prompt's blocks named once (``prompt_block_names``)."""
    return NewRequest(
        request_id,
        tuple(prompt),
        SamplingParams(max_tokens=512),
        predicted_output_tokens,
        prompt_block_names=prompt_block_names(prompt, block_size),
    )


def test_the_ingress_names_a_prompts_blocks_exactly_as_the_block_manager_does() -> None:
    blocks = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    tokens = [7, 3, 9, 1, 4, 4, 2, 8, 5, 6, 0, 1, 3]  # 3 full blocks and one token
    held = Request("a", list(tokens), SamplingParams(), arrival_s=0.0)
    blocks.grow(held, held.num_tokens)
    blocks.name_full_blocks(held, held.num_tokens)
    names = prompt_block_names(tokens, 4)
    assert len(names) == 3 and set(blocks.cached_block_names(100)) == set(names)
    # 12 tokens: the last block holds the last token, which is always computed, so it is not named.
    assert prompt_block_names(tokens[:12], 4) == names[:2]
    # Chained: changing the first token renames every block.
    assert set(prompt_block_names([0, *tokens[1:]], 4)).isdisjoint(names)


def test_a_replica_reports_in_use_blocks_then_the_most_recently_freed_and_the_names_round_trip() -> None:
    blocks = BlockManager(num_blocks=16, block_size=2, enable_prefix_caching=True)
    first, second, kept = (
        Request(i, list(t), SamplingParams(), 0.0)
        for i, t in (("a", [1, 2, 3]), ("b", [4, 5, 6]), ("c", [7, 8, 9]))
    )
    for r in (first, second, kept):
        blocks.grow(r, r.num_tokens)
        blocks.name_full_blocks(r, r.num_tokens)
    blocks.free(first)
    blocks.free(second)  # freed last: evicted last, so reported before "a"
    [a], [b], [c] = (prompt_block_names(t, 2) for t in ([1, 2, 3], [4, 5, 6], [7, 8, 9]))
    assert blocks.cached_block_names(10) == [c, b, a]
    assert blocks.cached_block_names(2) == [c, b]
    data = encode_block_names([c, b, a, -(2**63), 2**63 - 1])
    assert len(data) == 5 * 8
    assert decode_block_names(data) == {a, b, c, -(2**63), 2**63 - 1}


def test_least_cost_weighs_the_prefill_a_replica_saves_against_the_work_it_would_wait_behind() -> None:
    book = PredictedWorkBook(block_size=4)
    history = list(range(100, 180))  # 80 tokens: 20 blocks, of which 19 are cacheable
    turn = chat_turn("t2", [*history, 1, 2, 3, 4], predicted_output_tokens=20)
    book.report("warm", [60], 10.0, cached_names=prompt_block_names(history, 4))
    book.report("cold", [], 10.0)
    assert book.num_cached_tokens("warm", turn) == 76 and book.num_cached_tokens("cold", turn) == 0
    # warm: 8 uncached + min(60, 28) = 36; cold: 84 + 0 = 84.
    assert least_cost(book, ["cold", "warm"], turn) == ["warm", "cold"]
    # Cache-blind, the idle replica wins.
    assert least_predicted_work(book, ["cold", "warm"], turn) == ["cold", "warm"]
    # A much longer queue at the warm replica outweighs its cache: 8 + 4 x 28 = 120 > 84.
    book.report("warm", [60] * 4, 11.0, cached_names=prompt_block_names(history, 4))
    assert least_cost(book, ["warm", "cold"], turn) == ["cold", "warm"]


def test_least_cost_sends_a_new_conversation_to_the_smaller_cache_when_costs_are_equal() -> None:
    """Idle replicas between turns cost a fresh prompt the same: the one holding fewer histories (the
    follow-ups it will be sent) takes it, whatever order the replicas come in."""
    book = PredictedWorkBook(block_size=4)
    book.report("busy", [], 10.0, cached_names=prompt_block_names(list(range(100, 180)), 4))
    book.report("light", [], 10.0, cached_names=prompt_block_names(list(range(200, 220)), 4))
    fresh = chat_turn("f", [9] * 40, predicted_output_tokens=5)
    assert least_cost(book, ["busy", "light"], fresh) == ["light", "busy"]
    assert least_cost(book, ["light", "busy"], fresh) == ["light", "busy"]
    # The cost still comes first: queued work at the light replica outweighs its smaller cache.
    book.report("light", [30], 11.0, cached_names=prompt_block_names(list(range(200, 220)), 4))
    assert least_cost(book, ["light", "busy"], fresh) == ["busy", "light"]


def test_a_routed_prompt_counts_as_cached_at_its_replica_until_a_later_report() -> None:
    book = PredictedWorkBook(block_size=4)
    book.report("a", [], 10.0)
    book.report("b", [], 10.0)
    history = list(range(40))
    book.add("b", "t1", 50, routed_at_s=10.1, block_names=prompt_block_names(history, 4))
    book.complete("b", "t1")  # answered before any report: its prefix stays known
    turn = chat_turn("t2", [*history, 9, 9], predicted_output_tokens=10)
    assert book.num_cached_tokens("b", turn) == 36 and least_cost(book, ["a", "b"], turn) == ["b", "a"]
    book.report("b", [], 10.5, cached_names=())  # made after: what the replica says it holds wins
    assert book.num_cached_tokens("b", turn) == 0


def test_prefix_affinity_follows_the_longest_prefix_unless_loads_are_imbalanced() -> None:
    book = PredictedWorkBook(block_size=4)
    history = list(range(400))
    turn = chat_turn("t", [*history, 1], predicted_output_tokens=500)
    book.report("warm", [1000] * 3, 10.0, cached_names=prompt_block_names(history, 4))
    book.report("cold", [10], 10.0, cached_names=prompt_block_names([5] * 40, 4))
    book.report("idle", [], 10.0, cached_names=prompt_block_names([6] * 80, 4))
    # Balanced (3 against 0 requests): the longest match, whatever the work behind it.
    assert prefix_affinity(book, ["idle", "cold", "warm"], turn) == ["warm", "idle", "cold"]
    # No replica holds 10% of the prompt: the smallest cache first, the rest by load.
    fresh = chat_turn("f", [9] * 40, predicted_output_tokens=5)
    assert prefix_affinity(book, ["idle", "cold", "warm"], fresh) == ["cold", "idle", "warm"]
    # Imbalanced (more than IMBALANCED_REQUESTS apart): the least loaded, cache ignored.
    book.report("warm", [1] * (IMBALANCED_REQUESTS + 1), 11.0, cached_names=prompt_block_names(history, 4))
    assert prefix_affinity(book, ["warm", "cold", "idle"], turn) == ["idle", "cold", "warm"]


# ---- bins to pools, weighed against a cached prefix -------------------------------------------------


def test_a_turn_stays_in_the_pool_holding_its_history_unless_its_bin_is_far() -> None:
    router = BinRouter.build([50, 100, 200], num_pools=4, stay_min_cached_tokens=32, stay_max_bin_distance=1)
    pools = PrefixPools()
    history = list(range(80))
    pools.record(prompt_block_names(history, 4), pool_id=1)  # turn 1 was predicted into bin 1
    turn = prompt_block_names([*history, 7, 7, 7], 4)
    held = pools.held(turn, 4)
    assert held == {1: 76}
    assert router.route(120, held) == Route(bin_id=2, pool_id=1)  # one bin off: stays with its history
    assert router.route(500, held) == Route(bin_id=3, pool_id=3)  # two bins off: its bin's pool
    assert router.route(120, {1: 28}) == Route(bin_id=2, pool_id=2)  # too little cached
    assert BinRouter.build([50, 100, 200], 4).route(120, held) == Route(bin_id=2, pool_id=2)  # off
    assert pools.held(prompt_block_names([9, *history], 4), 4) == {}  # another prompt
    small = PrefixPools(capacity=3)
    small.record(prompt_block_names(history, 4), pool_id=0)
    assert small.held(turn, 4) == {0: 76}  # the longest names are the most recent
    assert small.held(prompt_block_names(history[:12], 4), 4) == {}  # its first blocks were dropped


def test_a_prefix_its_bin_s_pool_also_holds_does_not_hold_a_turn_elsewhere() -> None:
    """What counts is what moving would recompute: the tokens another pool holds beyond the bin's pool's."""
    router = BinRouter.build([50, 100, 200], num_pools=4, stay_min_cached_tokens=32, stay_max_bin_distance=1)
    pools = PrefixPools()
    system = list(range(40))  # a system prompt every pool has been sent
    for pool_id in range(4):
        pools.record(prompt_block_names([*system, pool_id], 4), pool_id)
    history = [*system, *range(100, 120)]
    pools.record(prompt_block_names(history, 4), pool_id=1)
    held = pools.held(prompt_block_names([*history, 7, 7, 7, 7], 4), 4)
    assert held == {0: 40, 1: 56, 2: 40, 3: 40}  # whole blocks, the last token always computed
    assert router.route(120, held) == Route(bin_id=2, pool_id=2)  # 16 more tokens in pool 1: too few
    pools.record(prompt_block_names([*history, *range(200, 220)], 4), pool_id=1)
    held = pools.held(prompt_block_names([*history, *range(200, 220), 7], 4), 4)
    assert held[1] - held[2] == 36
    assert router.route(120, held) == Route(bin_id=2, pool_id=1)  # 36 more: stays
    # Two pools near the bin hold more than its own: the one holding most.
    pools.record(prompt_block_names([*history, *range(200, 224)], 4), pool_id=3)
    held = pools.held(prompt_block_names([*history, *range(200, 224), 7], 4), 4)
    assert router.route(120, held) == Route(bin_id=2, pool_id=3)
