"""The autoscaling chain on Ray's fake multi-node provider: load -> Serve adds a replica -> the autoscaler
starts a GPU node for it -> the replica serves; idle -> Serve removes the replicas, down to zero -> the
autoscaler removes the nodes; a request then -> a replica and a node start again -> it is served.

    binserve bench scaling --json out/scaling.json         # a head whose autoscaler adds raylets, ~5 min

One engine pool between 0 and 2 replicas of one (declared) GPU each, on a head node with no GPU: every
replica needs a node the autoscaler starts (the first is deployed at once: Serve starts a pool with
``min_replicas`` 0 at one replica). Streams arrive one a second until a request runs on the second
replica; every stream must complete (no admitted request lost). Reported: load -> GPU node up, load ->
second replica RUNNING, load -> a request served by it; last arrival -> Serve down to one replica, ->
one GPU node left, -> zero replicas, -> no GPU node (Serve's graceful shutdown lets a removed replica
finish its streams). Then, at zero, two requests at once: one whose deadline is shorter than a cold start
ends with DEADLINE_EXCEEDED (the caller's deadline passed while the replica started: gRPC's code for it,
not UNAVAILABLE, which would invite an immediate retry that cannot be served sooner), the other is served
once a node and a replica have started (request -> first token from zero).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from bench.local_cluster import (
    APP_NAME,
    Served,
    add_command_flags,
    num_gpu_nodes_alive,
    num_outstanding_requests,
    replicas_by_node,
    run_command,
)
from bench.node_loss import StreamEnd, engine_stats, forced_streams, kv_blocks_held, until_engines_idle
from cluster.app import pool_name
from cluster.client import GenerationClient, make_request

PROMPT = "Write a long story about a lighthouse keeper and the sea, with many chapters."


SHORT_DEADLINE_S = 2.0
"""The deadline of the request that cannot be served from zero in time (a cold start takes far longer)."""


def autoscaled_pool(raw: dict) -> None:
    """``bench.local_cluster.deployed``'s config with a pool of 0-2 one-GPU replicas that scales fast."""
    raw["applications"][0]["args"]["pools"].update(
        min_replicas=0,
        max_replicas=2,
        num_gpus=1.0,
        target_outstanding_tokens=300,
        upscale_delay_s=1.0,
        downscale_delay_s=5.0,
        look_back_period_s=2.0,
        max_queued_requests=64,  # the load is queued, not refused, while the second replica comes
    )
    # A replica removed drains its streams: up to the longest one here (``scale_up_and_down``'s timeout).
    with_engine_options(graceful_shutdown_timeout_s=240.0)(raw)
    # Both ingress replicas on the head (the only node at first): one on a GPU node would keep that
    # node busy, and the autoscaler could never remove it (docs/DEPLOY.md, "The front door").
    raw["applications"][0]["args"]["ingress"]["max_replicas_per_node"] = None


@dataclass(frozen=True)
class ScalingReport:
    codes: dict[str, int]
    """How every stream ended: all OK, or a request was lost."""
    num_streams: int
    seconds_until_node_added: float | None
    seconds_until_replica_running: float | None
    seconds_until_new_replica_serves: float | None
    seconds_until_scaled_down: float | None
    """From the last arrival (the load drains from then on) until Serve runs one replica or none."""
    seconds_until_node_removed: float | None
    """From the last arrival until one GPU node or none is left."""
    seconds_until_scaled_to_zero: float | None
    """From the last arrival until Serve runs no replica of the pool."""
    seconds_until_nodes_removed: float | None
    """From the last arrival until no GPU node is left."""
    short_deadline_code: str | None
    """How the request sent at zero with a deadline of ``SHORT_DEADLINE_S`` ended."""
    seconds_from_zero_to_first_token: float | None
    """From a request sent at zero (no replica, no GPU node) to its first token."""
    from_zero_code: str | None
    """How that request ended (OK: served once a replica started)."""
    num_requests_after_zero: int | None
    """Requests the replicas started from zero accepted by then: 1 if the one whose deadline passed
    was dropped with its call, not sent on to the new replica to run for nobody."""


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
            while time.monotonic() - stop_s < timeout_s and "nodes_removed" not in marks:
                elapsed_s = time.monotonic() - stop_s
                num_replicas = await asyncio.to_thread(num_running_replicas)
                num_nodes = await asyncio.to_thread(num_gpu_nodes_alive)
                for mark, is_reached in (
                    ("scaled_down", num_replicas <= 1),
                    ("node_removed", "scaled_down" in marks and num_nodes <= 1),
                    ("scaled_to_zero", num_replicas == 0),
                    ("nodes_removed", "scaled_to_zero" in marks and num_nodes == 0),
                ):
                    if is_reached and mark not in marks:
                        marks[mark] = elapsed_s
                await asyncio.sleep(0.5)

        await asyncio.gather(*tasks, until_scaled_in())
        if "nodes_removed" in marks:
            short, served = await asyncio.gather(
                _first_token(client, SHORT_DEADLINE_S), _first_token(client, timeout_s)
            )
            stats = await asyncio.to_thread(engine_stats)
            num_after_zero = sum(n for s in stats for n in s.num_requests_by_bin.values())
        else:
            short, served, num_after_zero = (None, None), (None, None), None
    return ScalingReport(
        codes=dict(codes),
        num_streams=len(tasks),
        seconds_until_node_added=marks.get("node_added"),
        seconds_until_replica_running=marks.get("replica_running"),
        seconds_until_new_replica_serves=marks.get("new_replica_serves"),
        seconds_until_scaled_down=marks.get("scaled_down"),
        seconds_until_node_removed=marks.get("node_removed"),
        seconds_until_scaled_to_zero=marks.get("scaled_to_zero"),
        seconds_until_nodes_removed=marks.get("nodes_removed"),
        short_deadline_code=short[0],
        seconds_from_zero_to_first_token=served[1],
        from_zero_code=served[0],
        num_requests_after_zero=num_after_zero,
    )


async def _first_token(client: GenerationClient, deadline_s: float) -> tuple[str, float | None]:
    """How a short stream sent now ends, and the seconds until its first message (None: none came)."""
    start_s, first_s = time.monotonic(), None
    try:
        async for _ in client.generate_stream(make_request(PROMPT, max_tokens=8), timeout_s=deadline_s):
            first_s = first_s or time.monotonic() - start_s
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, first_s
    return "OK", first_s


def render(report: dict) -> str:
    """docs/RELIABILITY.md's table for a report of this command."""

    def seconds(key: str) -> str:
        return "never" if report[key] is None else f"{report[key]:.1f} s"

    def code(key: str) -> str:
        return report.get(key) or "not sent"

    codes = ", ".join(f"{n} {code}" for code, n in sorted(report["codes"].items()))
    return "\n".join(
        [
            "| deployed (first replica on a started node) | load -> GPU node up | -> 2nd replica RUNNING "
            "| -> it serves a request | last arrival -> one replica | -> one GPU node | -> zero replicas "
            "| -> no GPU node | streams |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {seconds('seconds_until_deployed_on_a_started_node')} | {seconds('seconds_until_node_added')} "
            f"| {seconds('seconds_until_replica_running')} | {seconds('seconds_until_new_replica_serves')} "
            f"| {seconds('seconds_until_scaled_down')} | {seconds('seconds_until_node_removed')} "
            f"| {seconds('seconds_until_scaled_to_zero')} | {seconds('seconds_until_nodes_removed')} | {codes} |",
            "",
            f"| at zero: a request with a {SHORT_DEADLINE_S:.0f} s deadline | a request without a short one "
            "| its first token after | requests the replica started from zero accepted |",
            "|---|---|---|---|",
            f"| {code('short_deadline_code')} | {code('from_zero_code')} "
            f"| {seconds('seconds_from_zero_to_first_token')} | {report.get('num_requests_after_zero')} |",
            f"\n{report['date']}; load average {report['load_average_at_start']:.1f} at the start, "
            f"{report['load_average_at_end']:.1f} at the end.",
        ]
    )


def cmd_bench_scaling(args: argparse.Namespace) -> int:
    from bench.local_cluster import autoscaling_cluster, deployed

    def measure(report: dict, model_dir: str) -> None:
        start_s = time.monotonic()
        with autoscaling_cluster(Path(args.scratch)) as _, deployed(model_dir, autoscaled_pool) as served:
            report["seconds_until_deployed_on_a_started_node"] = time.monotonic() - start_s
            report.update(asdict(asyncio.run(scale_up_and_down(served.address))))

    return run_command(args, measure, render)


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser("scaling", help="the autoscaling chain on Ray's fake multi-node provider")
    add_command_flags(p, scratch="out/scaling")
    p.set_defaults(func=cmd_bench_scaling)


# ---- a scale-in that cuts streams longer than the graceful shutdown -----------------------------------


@dataclass(frozen=True)
class ScaleInReport:
    """A scale-in under load. ``short`` streams end within the graceful shutdown timeout, ``long`` ones
    far later (each timed from the scale-in); the requests each engine replica held when it was asked
    for; the seconds until Serve ran one replica fewer (the removed one drained or cut); the KV blocks the
    remaining replicas held once idle (0: nothing leaked; None: never idle)."""

    short: tuple[StreamEnd, ...]
    long: tuple[StreamEnd, ...]
    short_tokens: int
    long_tokens: int
    num_requests_by_replica: tuple[int, ...]
    seconds_until_scaled_in: float | None
    num_kv_blocks_held: int | None


def with_engine_options(**options: Any) -> Callable[[dict], None]:
    """A config change setting Serve options of engine pool 0 (``deployments`` of the application)."""

    def configure(raw: dict) -> None:
        deployments = raw["applications"][0].setdefault("deployments", [])
        entry = next((d for d in deployments if d["name"] == pool_name(0)), None)
        if entry is None:
            entry = {"name": pool_name(0)}
            deployments.append(entry)
        entry.update(options)

    return configure


SCALE_IN_TOKENS = (32, 3000)
"""The forced tokens of a short stream and a long one in ``scale_in_under_load``."""


async def scale_in_under_load(
    served: Served, num_streams: int = 4, timeout_s: float = 300.0
) -> ScaleInReport:
    """With the pool at 2 replicas and its ``graceful_shutdown_timeout_s`` deployed: start
    ``num_streams`` long streams, then as many short ones, each once the previous one flows (so the
    router spreads them); then scale the pool in by one replica and wait for every stream and for the
    remaining replica to be idle."""

    short_tokens, long_tokens = SCALE_IN_TOKENS
    long, short = forced_streams(num_streams, long_tokens), forced_streams(num_streams, short_tokens)
    replicas = await asyncio.to_thread(replicas_by_node, pool_name(0))
    before = {r.actor_id for rs in replicas.values() for r in rs}
    async with GenerationClient(served.address) as client:
        tasks = []
        for stream in (*long, *short):
            tasks.append(asyncio.create_task(stream.run(client, timeout_s)))
            await stream.flowing.wait()
        held = tuple(s.num_unfinished_requests for s in await asyncio.to_thread(engine_stats))
        scaled_at_s = time.monotonic()
        scale_in = asyncio.to_thread(served.redeploy, with_engine_options(num_replicas=len(before) - 1))
        await asyncio.wait_for(asyncio.gather(scale_in, *tasks), timeout_s)

    async def until_scaled_in() -> float | None:
        while time.monotonic() - scaled_at_s < timeout_s:
            if await asyncio.to_thread(num_running_replicas) == len(before) - 1:
                return time.monotonic() - scaled_at_s
            await asyncio.sleep(0.2)
        return None

    scaled_in_s = await until_scaled_in()
    idle_s = await until_engines_idle(time.monotonic(), timeout_s)
    stats = await asyncio.to_thread(engine_stats)
    removed = list(before - {r.actor_id for rs in replicas_by_node(pool_name(0)).values() for r in rs})
    return ScaleInReport(
        short=tuple(s.end(scaled_at_s, removed) for s in short),
        long=tuple(s.end(scaled_at_s, removed) for s in long),
        short_tokens=short_tokens,
        long_tokens=long_tokens,
        num_requests_by_replica=held,
        seconds_until_scaled_in=scaled_in_s,
        num_kv_blocks_held=None if idle_s is None else kv_blocks_held(stats),
    )
