"""Losing a GPU node, then an ingress replica, while requests stream through the real gRPC proxy.

deploy/serve-gpu.yaml made small (``bench/local_cluster.py``: one pool of 2 engine replicas, 2 ingress
replicas, the proxy on the head) on a head node and two GPU-type nodes. The calls on what was lost end
with UNAVAILABLE, never INTERNAL; the others finish; Serve replaces what was lost. ``binserve bench
node-loss`` measures the times; here only an upper bound guards against a hang.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from bench.local_cluster import MultiNodeCluster, Served, deployed, multinode_cluster, replicas_by_node
from bench.node_loss import Loss, lose_under_load
from cluster.app import pool_name

MAX_TOKENS = 400
HANG_GUARD_S = 60.0


@pytest.fixture(scope="module")
def nodes() -> Iterator[MultiNodeCluster]:
    with multinode_cluster(num_gpu_nodes=2, cpus_per_gpu_node=2) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def served(nodes: MultiNodeCluster, chat_model: str) -> Iterator[Served]:
    with deployed(chat_model) as served:
        yield served


def test_engine_replicas_spread_over_the_gpu_nodes_and_the_proxy_runs_on_the_head(
    nodes: MultiNodeCluster, served: Served
) -> None:
    from ray import serve

    by_node = replicas_by_node(pool_name(0))
    # Half a GPU each: both would fit on one GPU node; Serve spreads them.
    assert sorted(by_node) == sorted(n.node_id for n in nodes.gpu_nodes)
    assert [len(replicas) for replicas in by_node.values()] == [1, 1]
    assert set(serve.status().proxies) == {nodes.head_node_id}  # proxy_location: HeadOnly


def test_a_lost_gpu_node_fails_only_its_calls_with_unavailable_and_serve_replaces_its_replica(
    nodes: MultiNodeCluster, served: Served
) -> None:
    report = asyncio.run(lose_under_load(served.address, nodes, Loss.NODE, max_tokens=MAX_TOKENS))
    assert report.failed and report.codes.get("OK", 0) > 0, report  # streams on both engine replicas
    assert set(report.codes) == {"OK", "UNAVAILABLE"}, report
    assert all(s.names_lost_replica for s in report.failed), report  # only the lost node's calls
    assert report.seconds_until_failed_calls_ended < HANG_GUARD_S
    assert report.seconds_until_served_again is not None, report
    assert report.seconds_until_replicas_replaced is not None, report
    assert report.seconds_until_engines_idle is not None, report
    [survivor] = nodes.gpu_nodes
    assert {n: len(r) for n, r in replicas_by_node(pool_name(0)).items()} == {survivor.node_id: 2}


def test_a_lost_ingress_replica_fails_its_calls_with_unavailable_and_another_serves(
    nodes: MultiNodeCluster, served: Served
) -> None:
    report = asyncio.run(lose_under_load(served.address, nodes, Loss.INGRESS, max_tokens=MAX_TOKENS))
    assert report.failed, report  # the proxy was calling it
    assert set(report.codes) <= {"OK", "UNAVAILABLE"}, report
    assert all(s.names_lost_replica for s in report.failed), report
    assert report.seconds_until_failed_calls_ended < HANG_GUARD_S
    assert report.seconds_until_served_again is not None, report
    assert report.seconds_until_replicas_replaced is not None, report
    # The lost calls' engine requests end (today by running to their end: not aborted), none is held.
    assert report.seconds_until_engines_idle is not None, report
