"""The autoscaling chain on Ray's fake multi-node provider: load -> Serve adds a replica -> the autoscaler
starts a GPU node for it -> the replica serves; idle -> Serve removes it -> the autoscaler removes the node.

    binserve bench scaling --json out/scaling.json         # a head whose autoscaler adds raylets, ~4 min

One engine pool between 1 and 2 replicas of one (declared) GPU each, on a head node with no GPU: even the
first replica needs a node the autoscaler starts. Streams arrive one a second until a request runs on the
second replica; every stream must complete (no admitted request lost). Reported: load -> GPU node up,
load -> second replica RUNNING, load -> a request served by it; last arrival -> Serve down to one
replica, -> the idle node removed (Serve's graceful shutdown lets a removed replica finish its streams).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from bench import write_report
from bench.local_cluster import APP_NAME, num_gpu_nodes_alive, num_outstanding_requests, replicas_by_node
from cluster.app import pool_name
from cluster.client import GenerationClient, make_request

PROMPT = "Write a long story about a lighthouse keeper and the sea, with many chapters."


def autoscaled_pool(raw: dict) -> None:
    """``bench.local_cluster.deployed``'s config with a pool of 1-2 one-GPU replicas that scales fast."""
    raw["applications"][0]["args"]["pools"].update(
        min_replicas=1,
        max_replicas=2,
        num_gpus=1.0,
        target_outstanding_tokens=300,
        upscale_delay_s=1.0,
        downscale_delay_s=5.0,
        look_back_period_s=2.0,
        max_queued_requests=64,  # the load is queued, not refused, while the second replica comes
    )


@dataclass(frozen=True)
class ScalingReport:
    codes: dict[str, int]
    """How every stream ended: all OK, or a request was lost."""
    num_streams: int
    seconds_until_node_added: float | None
    seconds_until_replica_running: float | None
    seconds_until_new_replica_serves: float | None
    seconds_until_scaled_down: float | None
    """From the last arrival (the load drains from then on) until Serve runs one replica again."""
    seconds_until_node_removed: float | None
    """From the last arrival until the idle GPU node is gone."""


def num_running_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications[APP_NAME].deployments[pool_name(0)]
    return deployment.replica_states.get("RUNNING", 0)


def is_served_by_new_node(first_node_ids: set[str]) -> bool:
    """Whether an engine replica on a node that was not there before holds a request."""
    replicas = replicas_by_node(pool_name(0))
    new = [r for node_id, rs in replicas.items() if node_id not in first_node_ids for r in rs]
    return any(num_outstanding_requests(r) > 0 for r in new)


async def scale_up_and_down(
    address: str, max_tokens: int = 1500, max_streams: int = 60, timeout_s: float = 240.0
) -> ScalingReport:
    first_node_ids = set(replicas_by_node(pool_name(0)))
    codes: Counter[str] = Counter()
    marks: dict[str, float] = {}
    async with GenerationClient(address) as client:

        async def stream(i: int) -> None:
            request = make_request(f"{i}. {PROMPT}", max_tokens=max_tokens, ignore_eos=True)
            try:
                async for _ in client.generate_stream(request, timeout_s=timeout_s):
                    pass
                codes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1

        start_s = time.monotonic()
        tasks = []
        while "new_replica_serves" not in marks and len(tasks) < max_streams:
            tasks.append(asyncio.create_task(stream(len(tasks))))
            await asyncio.sleep(1.0)
            elapsed_s = time.monotonic() - start_s
            if "node_added" not in marks and await asyncio.to_thread(num_gpu_nodes_alive) >= 2:
                marks["node_added"] = elapsed_s
            if "replica_running" not in marks and await asyncio.to_thread(num_running_replicas) >= 2:
                marks["replica_running"] = elapsed_s
            if "replica_running" in marks and await asyncio.to_thread(is_served_by_new_node, first_node_ids):
                marks["new_replica_serves"] = elapsed_s
        stop_s = time.monotonic()  # no more arrivals: the load only drains from here

        async def until_scaled_in() -> None:
            while time.monotonic() - stop_s < timeout_s and "node_removed" not in marks:
                if "scaled_down" not in marks and await asyncio.to_thread(num_running_replicas) == 1:
                    marks["scaled_down"] = time.monotonic() - stop_s
                if "scaled_down" in marks and await asyncio.to_thread(num_gpu_nodes_alive) == 1:
                    marks["node_removed"] = time.monotonic() - stop_s
                await asyncio.sleep(0.5)

        await asyncio.gather(*tasks, until_scaled_in())
    return ScalingReport(
        codes=dict(codes),
        num_streams=len(tasks),
        seconds_until_node_added=marks.get("node_added"),
        seconds_until_replica_running=marks.get("replica_running"),
        seconds_until_new_replica_serves=marks.get("new_replica_serves"),
        seconds_until_scaled_down=marks.get("scaled_down"),
        seconds_until_node_removed=marks.get("node_removed"),
    )


def render(report: dict) -> str:
    """docs/RELIABILITY.md's table for a report of this command."""

    def seconds(key: str) -> str:
        return "never" if report[key] is None else f"{report[key]:.1f} s"

    codes = ", ".join(f"{n} {code}" for code, n in sorted(report["codes"].items()))
    return "\n".join(
        [
            "| deployed (first replica on a started node) | load -> GPU node up | -> 2nd replica RUNNING "
            "| -> it serves a request | last arrival -> one replica | -> node removed | streams |",
            "|---|---|---|---|---|---|---|",
            f"| {seconds('seconds_until_deployed_on_a_started_node')} | {seconds('seconds_until_node_added')} "
            f"| {seconds('seconds_until_replica_running')} | {seconds('seconds_until_new_replica_serves')} "
            f"| {seconds('seconds_until_scaled_down')} | {seconds('seconds_until_node_removed')} | {codes} |",
            f"\n{report['date']}; load average {report['load_average_at_start']:.1f} at the start, "
            f"{report['load_average_at_end']:.1f} at the end.",
        ]
    )


def cmd_bench_scaling(args: argparse.Namespace) -> int:
    from bench.local_cluster import autoscaling_cluster, deployed
    from workers.tiny_model import make_tiny_model

    scratch = Path(args.scratch)
    model_dir = args.model or str(make_tiny_model(scratch / "model", arch="llama", seed=0))
    report: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_at_start": os.getloadavg()[0],
    }
    start_s = time.monotonic()
    with autoscaling_cluster(scratch) as _, deployed(model_dir, autoscaled_pool) as served:
        report["seconds_until_deployed_on_a_started_node"] = time.monotonic() - start_s
        report.update(asdict(asyncio.run(scale_up_and_down(served.address))))
    report["load_average_at_end"] = os.getloadavg()[0]
    write_report(args.json, report)
    print(render(report))
    return 0


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser("scaling", help="the autoscaling chain on Ray's fake multi-node provider")
    p.add_argument("--model", help="checkpoint directory to serve (default: the tiny test model)")
    p.add_argument("--scratch", default="out/scaling", help="where the autoscaler config and model go")
    p.add_argument("--json", help="write the report here")
    p.set_defaults(func=cmd_bench_scaling)
