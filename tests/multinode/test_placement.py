"""Placement across nodes: one replica's pipeline stages on two nodes give exactly the tokens of one
process; ``parallel.stage_placement`` decides; the proxy runs where ``proxy_location`` says.

A head node (1 CPU) and two GPU-type worker nodes (3 CPUs each), each its own raylet
(``bench/local_cluster.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from bench.local_cluster import APP_NAME, MultiNodeCluster, deployed, multinode_cluster
from cluster.client import GenerationClient, make_request
from pipeline.config import EngineConfig, ModelConfig, ParallelConfig, StagePlacement
from pipeline.request import SamplingParams

PROMPTS = ["Hello", "a b c d e f g", "Write a long story about a dragon who learns to cook.", "x"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def nodes() -> Iterator[MultiNodeCluster]:
    with multinode_cluster(num_gpu_nodes=2, cpus_per_gpu_node=3) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def one_process_tokens(chat_model: str) -> list[list[int]]:
    """Greedy tokens of the whole model in this process (no Ray)."""
    from workers.llm import LLM

    llm = LLM(EngineConfig(ModelConfig(chat_model, device="cpu")))
    return [
        list(d.completion.output_token_ids)
        for d in llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS))
    ]


@pytest.mark.parametrize("placement", list(StagePlacement))
def test_stage_placement_packs_or_spreads_the_stages_and_the_tokens_do_not_change(
    nodes: MultiNodeCluster, chat_model: str, one_process_tokens: list[list[int]], placement: StagePlacement
) -> None:
    from workers.llm import LLM

    parallel = ParallelConfig(pp_size=2, stage_placement=placement.value)
    llm = LLM(EngineConfig(ModelConfig(chat_model, device="cpu"), parallel=parallel))
    try:
        done = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS))
        stage_nodes = llm.runner.stage_node_ids
    finally:
        llm.shutdown()
    assert [list(d.completion.output_token_ids) for d in done] == one_process_tokens
    # Two 1-CPU stages fit on one 3-CPU worker: packed they share it, spread they do not.
    num_nodes = 1 if placement is StagePlacement.PACK else 2
    assert len(set(stage_nodes)) == num_nodes, stage_nodes


def test_a_served_replica_spread_over_two_nodes_gives_one_process_tokens_through_the_proxy(
    nodes: MultiNodeCluster, chat_model: str, one_process_tokens: list[list[int]]
) -> None:
    from ray import serve

    from cluster.app import pool_name

    def spread_pipeline(raw: dict) -> None:
        args = raw["applications"][0]["args"]
        args["parallel"] = {"pp_size": 2, "stage_placement": "spread"}
        args["pools"].update(min_replicas=1, max_replicas=1, num_gpus=0.0)

    async def generate_all(address: str) -> list:
        async with GenerationClient(address) as client:
            calls = [client.generate(make_request(p, max_tokens=MAX_TOKENS), timeout_s=120) for p in PROMPTS]
            return await asyncio.gather(*calls)

    with deployed(chat_model, spread_pipeline) as served:
        stats = serve.get_deployment_handle(pool_name(0), app_name=APP_NAME).stats.remote().result()
        responses = asyncio.run(generate_all(served.address))
        proxy_nodes = set(serve.status().proxies)
    replica_node, *stage_nodes = stats.node_ids
    assert stats.pp_size == 2 and len(set(stage_nodes)) == 2, stats.node_ids
    assert [list(r.token_ids) for r in responses] == one_process_tokens
    assert proxy_nodes == {nodes.head_node_id}  # proxy_location: HeadOnly
