"""The length-aware replica router on a real local Serve app: one pool of two tiny-model replicas routed by
least predicted work (``cluster/replica_router.py``). The choice itself is checked exactly, without Ray, in
``tests/test_router.py``; here the app deploys with it, replicas report their work, and requests are served.
"""

from __future__ import annotations

import asyncio
import collections
import time

from cluster.client import GenerationClient, make_request
from proto.binserve.v1 import generation_pb2 as pb
from tests.test_cluster import serving

NUM_REQUESTS = 12


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
