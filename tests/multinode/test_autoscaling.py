"""The autoscaling chain on Ray's fake multi-node provider (``bench/scaling.py``): load makes Serve add a
replica (the predicted-tokens policy), the replica that does not fit makes the autoscaler start a GPU
node, the new replica serves; idle, the pool scales down to its minimum, zero, and the idle nodes are
removed; at zero, a request whose deadline is shorter than a cold start ends with DEADLINE_EXCEEDED and
one without is served once a node and a replica have started. No admitted request is lost. ``binserve
bench scaling`` measures the times.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.local_cluster import autoscaling_cluster, deployed, num_gpu_nodes_alive
from bench.scaling import autoscaled_pool, num_running_replicas, scale_up_and_down


def test_load_adds_a_replica_on_a_started_node_idle_scales_to_zero_and_a_request_brings_one_back(
    chat_model: str, tmp_path: Path
) -> None:
    with autoscaling_cluster(tmp_path) as _, deployed(chat_model, autoscaled_pool) as served:
        # The head has no GPU: the first replica already ran on a node the autoscaler started.
        assert num_gpu_nodes_alive() == 1
        report = asyncio.run(scale_up_and_down(served.address, max_tokens=600))
        assert report.codes == {"OK": report.num_streams}, report  # no admitted request lost
        assert report.seconds_until_node_added is not None, report
        assert report.seconds_until_new_replica_serves is not None, report
        assert report.seconds_until_scaled_down is not None, report
        assert report.seconds_until_node_removed is not None, report
        assert report.seconds_until_scaled_to_zero is not None, report  # min_replicas 0
        assert report.seconds_until_nodes_removed is not None, report
        # From zero: the short deadline passes during the cold start; the other request is served.
        assert (report.short_deadline_code, report.from_zero_code) == ("DEADLINE_EXCEEDED", "OK"), report
        assert report.seconds_from_zero_to_first_token is not None, report
        assert report.num_requests_after_zero == 1, report  # the expired request was not run for nobody
        assert (num_running_replicas(), num_gpu_nodes_alive()) == (1, 1)
