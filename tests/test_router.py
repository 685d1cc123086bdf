"""The router: lengths to bins, bins to pools, and a pool's replica by predicted work. Pure Python, checked
exhaustively on small cases."""

from __future__ import annotations

import dataclasses
import random

import pytest

from cluster.predictor.lengths import equal_mass_boundaries
from cluster.router import BinRouter, PredictedWorkBook, Route, pools_for_bins
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
