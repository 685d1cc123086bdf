"""Fault and load checks on the served application: overload, cancel storms, killed stages and replicas.

    binserve bench reliability --model .models/tiny-llama --json out/reliability.json          # full scale
    binserve bench reliability --model .models/tiny-llama --small                             # a quick pass

Each check runs against a local cluster this process drives (``serving_locally``), so it can also ask
every engine replica how many KV blocks are allocated. tests/test_reliability.py runs the same checks at
a small scale; the fuzzing of every gRPC field and HTTP body is a hypothesis test there.

- **overload**: a burst of ``burst_factor`` x what the engine queues hold. Excess calls must be refused
  fast (RESOURCE_EXHAUSTED), the admitted ones complete, replica memory stays bounded.
- **cancel storm**: streams cancelled at random points, and deadlines that expire mid-prefill; afterwards
  no KV block is allocated, and the time from the last cancel until the pools are empty is reported.
- **kill**: while traffic flows, SIGKILL one stage actor (or a whole engine replica): in-flight calls end
  with UNAVAILABLE within seconds, Serve replaces the replica, and the time until a new request
  succeeds again is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import time
from collections import Counter
from dataclasses import asdict, dataclass

import grpc

from bench import write_report
from bench.request_stats import percentile
from cluster.client import GenerationClient, make_request

APP_NAME = "binserve"
PROMPTS = (
    "Hello there, how are you today?",
    "Write a long story about a lighthouse keeper and the sea, with many chapters.",
    "List the planets of the solar system in order from the sun, with one fact about each.",
    "x",
)


# ---- cluster introspection (this process is the cluster's driver) ------------------------------------


def kv_blocks_in_use(num_pools: int) -> int:
    """KV blocks allocated across the engine pools (one replica each is asked)."""
    from ray import serve

    from cluster.app import pool_name

    total = 0
    for pool_id in range(num_pools):
        stats = serve.get_deployment_handle(pool_name(pool_id), app_name=APP_NAME).stats.remote().result()
        total += stats.num_kv_blocks - stats.num_free_kv_blocks
    return total


async def wait_for_no_blocks(num_pools: int, timeout_s: float = 30.0) -> float | None:
    """Seconds until no KV block is allocated anywhere, or None if that did not happen in time."""
    start_s = time.monotonic()
    while time.monotonic() - start_s < timeout_s:
        if await asyncio.to_thread(kv_blocks_in_use, num_pools) == 0:
            return time.monotonic() - start_s
        await asyncio.sleep(0.05)
    return None


def engine_pids(num_pools: int) -> tuple[list[int], list[int]]:
    """The engine replicas' processes and their stage actors' (one replica per pool is asked)."""
    from ray import serve

    from cluster.app import pool_name

    replicas, stages = [], []
    for pool_id in range(num_pools):
        stats = serve.get_deployment_handle(pool_name(pool_id), app_name=APP_NAME).stats.remote().result()
        replicas.append(stats.pids[0])
        stages.extend(stats.pids[1:])
    return replicas, stages


def rss_bytes(pids: list[int]) -> int:
    import psutil

    return sum(psutil.Process(pid).memory_info().rss for pid in pids if psutil.pid_exists(pid))


# ---- the checks ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OverloadReport:
    num_calls: int
    num_completed: int
    num_refused: int
    num_other: dict[str, int]
    p50_refusal_s: float | None
    p99_refusal_s: float | None
    p50_completion_s: float | None
    replica_rss_before_bytes: int
    replica_rss_after_bytes: int
    kv_blocks_in_use_after: int


async def overload(address: str, num_calls: int, num_pools: int, max_tokens: int = 8) -> OverloadReport:
    rss_before = rss_bytes(sum(await asyncio.to_thread(engine_pids, num_pools), []))
    refusals, completions, others = [], [], Counter()

    async with GenerationClient(address) as client:

        async def call(i: int) -> None:
            start_s = time.monotonic()
            request = make_request(PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens, ignore_eos=True)
            try:
                await client.generate(request, timeout_s=300)
                completions.append(time.monotonic() - start_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    refusals.append(time.monotonic() - start_s)
                else:
                    others[exc.code().name] += 1

        await asyncio.gather(*(call(i) for i in range(num_calls)))
    await wait_for_no_blocks(num_pools)
    rss_after = rss_bytes(sum(await asyncio.to_thread(engine_pids, num_pools), []))
    return OverloadReport(
        num_calls=num_calls,
        num_completed=len(completions),
        num_refused=len(refusals),
        num_other=dict(others),
        p50_refusal_s=_percentile(refusals, 50),
        p99_refusal_s=_percentile(refusals, 99),
        p50_completion_s=_percentile(completions, 50),
        replica_rss_before_bytes=rss_before,
        replica_rss_after_bytes=rss_after,
        kv_blocks_in_use_after=await asyncio.to_thread(kv_blocks_in_use, num_pools),
    )


@dataclass(frozen=True)
class CancelStormReport:
    num_streams: int
    num_cancelled: int
    num_deadlines: int
    num_ran_to_completion: int
    """Streams meant to be cancelled that still finished (the cancel arrived too late, or was lost)."""
    num_refused: int
    """Streams refused at once (RESOURCE_EXHAUSTED) because the storm exceeded the admission bound."""
    seconds_until_no_blocks: float | None
    kv_blocks_in_use_after: int


async def cancel_storm(address: str, num_streams: int, num_pools: int, seed: int = 0) -> CancelStormReport:
    """Half the streams are cancelled after a random number of messages, half get a deadline short
    enough to expire during their prefill or first tokens."""
    rng = random.Random(seed)
    completed = 0
    cancelled = deadlines = refused = 0

    async with GenerationClient(address) as client:

        async def cancelled_stream(i: int) -> None:
            nonlocal completed, cancelled, refused
            request = make_request(PROMPTS[i % len(PROMPTS)] * 20, max_tokens=200, ignore_eos=True)
            stop_after = rng.randint(0, 5)
            call = client.generate_stream(request)
            received = 0
            try:
                async for message in call:
                    received += 1
                    if message.finish_reason:
                        completed += 1
                        return
                    if received > stop_after:
                        break
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                refused += 1
                return
            cancelled += 1
            call.cancel()

        async def expiring_stream(i: int) -> None:
            nonlocal completed, deadlines, refused
            request = make_request(PROMPTS[i % len(PROMPTS)] * 40, max_tokens=200, ignore_eos=True)
            try:
                async for message in client.generate_stream(request, timeout_s=rng.uniform(0.05, 0.5)):
                    if message.finish_reason:
                        completed += 1
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    refused += 1
                    return
                if exc.code() is not grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
                deadlines += 1

        tasks = [cancelled_stream(i) if i % 2 else expiring_stream(i) for i in range(num_streams)]
        await asyncio.gather(*tasks)
    waited_s = await wait_for_no_blocks(num_pools)
    return CancelStormReport(
        num_streams=num_streams,
        num_cancelled=cancelled,
        num_deadlines=deadlines,
        num_ran_to_completion=completed,
        num_refused=refused,
        seconds_until_no_blocks=waited_s,
        kv_blocks_in_use_after=await asyncio.to_thread(kv_blocks_in_use, num_pools),
    )


@dataclass(frozen=True)
class KillReport:
    target: str
    num_in_flight: int
    codes: dict[str, int]
    """How the in-flight calls ended (calls on another pool than the killed process finish OK)."""
    seconds_until_failed_calls_ended: float | None
    """From the kill to the last of the failed calls' errors reaching the client."""
    seconds_until_served_again: float | None


async def kill_under_load(
    address: str, target: str, num_pools: int, num_streams: int = 4, recovery_timeout_s: float = 120.0
) -> KillReport:
    """``target``: ``stage`` (one pipeline stage actor) or ``replica`` (one engine replica), SIGKILLed
    while ``num_streams`` long streams are in flight."""
    codes: Counter[str] = Counter()
    failed_at_s: list[float] = []
    async with GenerationClient(address) as client:
        started = [asyncio.Event() for _ in range(num_streams)]

        async def stream(i: int) -> None:
            # Long enough to be in flight when the kill comes (ingress limits allow 1,024 in serve-local).
            request = make_request(PROMPTS[i % len(PROMPTS)], max_tokens=1000, ignore_eos=True)
            try:
                async for _ in client.generate_stream(request, timeout_s=recovery_timeout_s):
                    started[i].set()
                codes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                failed_at_s.append(time.monotonic())
                started[i].set()
                codes[exc.code().name] += 1

        tasks = [asyncio.create_task(stream(i)) for i in range(num_streams)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), timeout=60)
        replicas, stages = await asyncio.to_thread(engine_pids, num_pools)
        pids = stages if target == "stage" else replicas
        if not pids:
            raise ValueError(f"target: no {target} process to kill (a stage needs pp_size > 1)")
        os.kill(pids[0], signal.SIGKILL)
        killed_s = time.monotonic()
        await asyncio.gather(*tasks)
        failed_s = max(failed_at_s) - killed_s if failed_at_s else None
        served_again_s = None
        while time.monotonic() - killed_s < recovery_timeout_s:
            try:
                # Every pool must serve again: ask each bin's worth of prompts.
                await asyncio.gather(
                    *(client.generate(make_request(p, max_tokens=2), timeout_s=10) for p in PROMPTS)
                )
                served_again_s = time.monotonic() - killed_s
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(1.0)
    return KillReport(target, num_streams, dict(codes), failed_s, served_again_s)


def _percentile(values: list[float], q: float) -> float | None:
    """``bench.request_stats.percentile``, with None (not NaN) for no values: the report is strict JSON."""
    return percentile(values, q) if values else None


# ---- the command ----------------------------------------------------------------------------------------


async def run_all(address: str, num_pools: int, queue_capacity: int, small: bool) -> dict:
    load = os.getloadavg()[0]
    report: dict = {"load_average_at_start": load, "queue_capacity": queue_capacity}
    burst = (2 if small else 10) * queue_capacity
    report["overload"] = asdict(await overload(address, burst, num_pools))
    print(f"overload: {report['overload']}", flush=True)
    report["cancel_storm"] = asdict(await cancel_storm(address, 20 if small else 100, num_pools))
    print(f"cancel storm: {report['cancel_storm']}", flush=True)
    for target in ("stage", "replica"):
        report[f"kill_{target}"] = asdict(await kill_under_load(address, target, num_pools))
        print(f"kill {target}: {report[f'kill_{target}']}", flush=True)
    report["load_average_at_end"] = os.getloadavg()[0]
    return report


def cmd_bench_reliability(args: argparse.Namespace) -> int:
    from cluster.local import load_serve_config, serving_locally

    config = load_serve_config(args.config, model_dir=args.model)
    app_args = config.applications[0].args
    pools = app_args.get("pools") or {}
    num_pools = (app_args.get("router") or {}).get("num_pools") or (app_args.get("router") or {}).get(
        "num_bins", 2
    )
    queue_capacity = num_pools * pools.get("max_queued_requests", 256)
    with serving_locally(args.config, args.model, num_cpus=args.num_cpus) as address:
        report = asyncio.run(run_all(address, num_pools, queue_capacity, args.small))
    report["median_refusal_ms"] = (
        None if report["overload"]["p50_refusal_s"] is None else 1000 * report["overload"]["p50_refusal_s"]
    )
    write_report(args.json, report)
    return 0


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser("reliability", help="overload, cancel storm, killed stage and replica")
    p.add_argument("--model", required=True, help="checkpoint directory to serve")
    p.add_argument("--config", default="deploy/serve-local.yaml", help="the Serve config to run")
    p.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local cluster")
    p.add_argument("--small", action="store_true", help="a quick pass: 2x the queues, 20 streams")
    p.add_argument("--json", help="write the report here")
    p.set_defaults(func=cmd_bench_reliability)
