"""Losing a GPU node, then an ingress replica, while requests stream through the real gRPC proxy.

deploy/serve-gpu.yaml made small (``bench/local_cluster.py``: one pool of 2 engine replicas, 2 ingress
replicas on two nodes, the proxy on the head spreading its calls over both) on a head node and two
GPU-type nodes. The calls on what was lost (its engine replica, or its ingress replica) end with
UNAVAILABLE, never INTERNAL; the others finish intact; Serve replaces what was lost. ``binserve bench
node-loss`` measures the times; here only upper bounds guard against a hang.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from bench.local_cluster import (
    APP_NAME,
    MultiNodeCluster,
    Served,
    deployed,
    multinode_cluster,
    replicas_by_node,
)
from bench.node_loss import Loss, LossReport, lose_under_load
from bench.scaling import scale_in_under_load, with_engine_options
from cluster.app import INGRESS_NAME, pool_name

MAX_TOKENS = 400
HANG_GUARD_S = 60.0
GRACEFUL_SHUTDOWN_S = 5.0
"""The engine pool's ``graceful_shutdown_timeout_s`` here: far longer than a short stream's rest, far
shorter than a long one's."""
ORPHAN_ABORT_BOUND_S = 30.0
"""A dead ingress replica's engine requests are aborted within this (docs/RELIABILITY.md): one check a
second once Ray declares the caller dead, with room for this loaded machine. Their natural end, 400
tokens each on two shared cores, is not what ends them: the abort count says so."""


@pytest.fixture(scope="module")
def nodes() -> Iterator[MultiNodeCluster]:
    with multinode_cluster(num_gpu_nodes=2, cpus_per_gpu_node=2) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def served(nodes: MultiNodeCluster, chat_model: str) -> Iterator[Served]:
    with deployed(chat_model, with_engine_options(graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S)) as served:
        yield served


def ingress_nodes() -> list[str]:
    return [node_id for node_id, replicas in replicas_by_node(INGRESS_NAME).items() for _ in replicas]


def test_replicas_spread_over_the_nodes_and_the_proxy_runs_on_the_head(
    nodes: MultiNodeCluster, served: Served
) -> None:
    from ray import serve

    by_node = replicas_by_node(pool_name(0))
    # Half a GPU each: both would fit on one GPU node; Serve spreads them.
    assert sorted(by_node) == sorted(n.node_id for n in nodes.gpu_nodes)
    assert [len(replicas) for replicas in by_node.values()] == [1, 1]
    assert len(set(ingress_nodes())) == 2  # ingress.max_replicas_per_node: 1
    assert set(serve.status().proxies) == {nodes.head_node_id}  # proxy_location: HeadOnly


def assert_only_the_calls_on_the_lost_fail(report: LossReport, is_caller_death_known_at_once: bool) -> None:
    """Every stream that ran on what was lost ends with UNAVAILABLE naming it; every other one is intact;
    the surviving engine replicas hold nothing of a lost ingress replica's requests afterwards."""
    assert report.num_streams_on_lost > 0 and report.failed, report
    assert {s.code for s in report.failed} == {"UNAVAILABLE"}, report  # never INTERNAL
    assert len(report.failed) == report.num_streams_on_lost, report
    assert all(s.names_lost_replica for s in report.failed), report
    assert report.num_intact_streams == len(report.streams) - report.num_streams_on_lost, report
    assert report.seconds_until_failed_calls_ended < HANG_GUARD_S
    assert report.seconds_until_served_again is not None, report
    assert report.seconds_until_replicas_replaced is not None, report
    # The engine replicas abort the requests of a dead ingress replica and free every block. A killed
    # process is known dead at once, so all are aborted (within the bound docs/RELIABILITY.md states);
    # a lost node's actors only once the GCS declares the node dead (its health checks: 6-20 s here), and
    # a 400-token stream may have ended by itself before that.
    if is_caller_death_known_at_once:
        assert report.num_orphaned_requests == report.num_streams_of_lost_ingress_elsewhere, report
        assert report.seconds_until_engines_idle < ORPHAN_ABORT_BOUND_S, report
    assert report.num_orphaned_requests <= report.num_streams_of_lost_ingress_elsewhere, report
    assert report.seconds_until_engines_idle is not None, report
    assert report.num_kv_blocks_held == 0, report


def test_a_lost_gpu_node_fails_only_the_calls_on_its_engine_and_ingress_replicas_and_serve_replaces_them(
    nodes: MultiNodeCluster, served: Served
) -> None:
    report = asyncio.run(lose_under_load(served.address, nodes, Loss.NODE, max_tokens=MAX_TOKENS))
    assert report.lost_actors.count(f"ServeReplica:{APP_NAME}:{INGRESS_NAME}") == 1, report
    assert report.num_streams_on_lost < len(report.streams), report  # the proxy spread the calls
    assert_only_the_calls_on_the_lost_fail(report, is_caller_death_known_at_once=False)
    [survivor] = nodes.gpu_nodes
    assert {n: len(r) for n, r in replicas_by_node(pool_name(0)).items()} == {survivor.node_id: 2}
    assert len(set(ingress_nodes())) == 2  # the replacement on another remaining node


def test_a_lost_ingress_replica_fails_its_calls_with_unavailable_and_another_serves(
    nodes: MultiNodeCluster, served: Served
) -> None:
    report = asyncio.run(lose_under_load(served.address, nodes, Loss.INGRESS, max_tokens=MAX_TOKENS))
    assert report.num_streams_on_lost_engines == 0, report
    assert report.num_streams_on_lost < len(report.streams), report  # the proxy spread the calls
    assert_only_the_calls_on_the_lost_fail(report, is_caller_death_known_at_once=True)


def test_a_scale_in_lets_short_streams_finish_and_cuts_long_ones_with_unavailable(served: Served) -> None:
    report = asyncio.run(scale_in_under_load(served))
    assert all(n > 0 for n in report.num_requests_by_replica), report  # both replicas streamed
    # Short streams finish intact across the scale-in, wherever they ran.
    assert [(s.code, s.num_tokens) for s in report.short] == [("OK", report.short_tokens)] * len(report.short)
    # Long streams on the removed replica are cut when its graceful shutdown times out: UNAVAILABLE,
    # naming it; those on the other one finish intact.
    cut = [s for s in report.long if s.code != "OK"]
    assert cut and all(s.code == "UNAVAILABLE" and s.names_lost_replica for s in cut), report
    assert all(s.num_tokens == report.long_tokens for s in report.long if s.code == "OK"), report
    assert report.seconds_until_scaled_in is not None, report
    assert report.num_kv_blocks_held == 0, report
