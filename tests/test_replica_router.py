"""The replica router (``cluster/replica_router.py``): Serve's hooks driven by hand, without a cluster, then
on a real local Serve app (one pool of two tiny-model replicas routed by least predicted work: the app
deploys with it, replicas report their work, and requests are served). The rules themselves are checked
exactly in ``tests/test_router.py``.
"""

from __future__ import annotations

import asyncio
import collections
import time
from types import SimpleNamespace

import pytest

from cluster.client import GenerationClient, make_request
from cluster.replica_router import BookRouter, routing_stats
from pipeline.block_manager import prompt_block_names
from pipeline.request import NewRequest, SamplingParams
from proto.binserve.v1 import generation_pb2 as pb
from tests.test_cluster import serving

NUM_REQUESTS = 12


def book_router(routing: str, replicas: dict[str, dict]) -> BookRouter:
    """A router as Serve builds it in a caller, over fake replicas carrying these routing stats."""
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    router = BookRouter(
        deployment_id=DeploymentID(name="pool", app_name="app"), handle_source=DeploymentHandleSource.UNKNOWN
    )
    router.initialize_state(routing=routing, block_size=4)
    router._replicas = {
        rid: SimpleNamespace(replica_id=rid, routing_stats=stats) for rid, stats in replicas.items()
    }
    return router


def pending(request_id: str, new: NewRequest) -> SimpleNamespace:
    """What Serve hands ``choose_replicas`` for one ``generate`` call."""
    return SimpleNamespace(
        args=(new,),
        metadata=SimpleNamespace(internal_request_id=request_id),
        routing_context=SimpleNamespace(should_backoff=False),
    )


async def choose(router: BookRouter, request: SimpleNamespace) -> str:
    ranks = await router.choose_replicas(list(router.curr_replicas.values()), request)
    return ranks[0][0].replica_id


@pytest.mark.parametrize("routing", ["least_predicted_work", "least_cost"])
def test_a_burst_between_two_reports_spreads_over_the_replicas(routing: str) -> None:
    # One stale report each: "a" holds one request. Before the fix, every request of the burst read the
    # same reports (none was counted until its replica accepted it) and all 8 went to "b".
    router = book_router(routing, {"a": routing_stats([100]), "b": routing_stats([])})
    burst = [
        pending(f"r{i}", NewRequest(f"r{i}", (1,) * 10, SamplingParams(max_tokens=64), 40)) for i in range(8)
    ]

    async def route_all() -> list[str]:
        return [await choose(router, request) for request in burst]  # no on_request_routed in between

    counts = collections.Counter(asyncio.run(route_all()))
    assert sorted(counts.values()) in ([3, 5], [4, 4])  # "a" starts one request behind
    # A request Serve sent elsewhere (its first choice was full) moves there; a completed one leaves.
    moved = burst[0]
    first = next(r for r, reqs in router.book.routed.items() if "r0" in reqs)
    other = "a" if first == "b" else "b"
    router.on_request_routed(moved, other, result=None)
    assert "r0" in router.book.routed[other] and "r0" not in router.book.routed[first]
    router.on_request_completed(other, "r0")
    assert sum(len(reqs) for reqs in router.book.routed.values()) == 7


def test_a_conversation_turn_follows_its_cached_prefix_through_the_reports() -> None:
    history = list(range(64))
    warm = routing_stats([30], cached_block_names=prompt_block_names(history, 4))
    router = book_router("least_cost", {"a": routing_stats([]), "b": warm})
    turn = NewRequest(
        "t",
        (*history, 5, 6),
        SamplingParams(max_tokens=64),
        20,
        prompt_block_names=prompt_block_names([*history, 5, 6], 4),
    )
    assert asyncio.run(choose(router, pending("t", turn))) == "b"
    # The same stats, routed cache-blind: the idle replica.
    router = book_router("least_predicted_work", {"a": routing_stats([]), "b": warm})
    assert asyncio.run(choose(router, pending("t", turn))) == "a"


def two_replicas_of_one_pool(raw: dict) -> None:
    args = raw["applications"][0]["args"]
    args["router"] = {"num_bins": 1}
    args["pools"].update(min_replicas=2, max_replicas=2, replica_routing="least_predicted_work")
    args["pools"]["routing_stats_period_s"] = 0.2


def test_a_pool_routed_by_predicted_work_serves_requests_on_both_replicas(tiny_llama: str) -> None:
    from ray import serve

    from cluster.app import pool_name

    with serving(tiny_llama, two_replicas_of_one_pool) as cluster:
        deployment = serve.status().applications["binserve"].deployments[pool_name(0)]
        assert sum(deployment.replica_states.values()) == 2

        async def main() -> list[pb.GenerateResponse]:
            async with GenerationClient(cluster.address) as client:
                calls = [
                    client.generate_timed(
                        make_request(f"request {i} " * (1 + i), max_tokens=24), stream=False, timeout_s=120
                    )
                    for i in range(NUM_REQUESTS)
                ]
                return [timed.response for timed in await asyncio.gather(*calls)]

        responses = asyncio.run(main())
        assert all(0 < r.usage.num_output_tokens <= 24 for r in responses)

        # Idle replicas report no work, so `stats` calls land on either at random: gather both. Pause
        # between calls so that a report taken while a replica was still busy is replaced (every 0.2 s).
        by_pid = {}
        for _ in range(40):
            stats = cluster.stats(0)
            by_pid[stats.pids[0]] = stats
            if len(by_pid) == 2:
                break
            time.sleep(0.25)
        assert len(by_pid) == 2
        served = collections.Counter({pid: sum(s.num_requests_by_bin.values()) for pid, s in by_pid.items()})
        assert sum(served.values()) == NUM_REQUESTS and min(served.values()) > 0
