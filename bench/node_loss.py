"""Losing a node, or an ingress replica, while requests stream through the gRPC proxy.

    binserve bench node-loss --json out/node_loss.json        # a 3-raylet cluster on this machine, ~3 min

On a head node and two GPU-type nodes (``bench/local_cluster.py``: deploy/serve-gpu.yaml made small,
one pool of 2 engine replicas, 2 ingress replicas on two nodes, the proxy on the head spreading its calls
over both), long streams run; then

- **node**: the GPU node of one engine replica and of an ingress replica is killed (raylet and every
  worker process, SIGKILL);
- **ingress**: the process of one ingress replica is killed (the head cannot be removed here: it holds
  the driver).

Reported: which streams ran on what was lost at the kill (on a lost engine replica, or through a lost
ingress replica: the engine replicas count their calls by caller), how each stream ended and whether the
OK ones are intact, when the failed ones ended (from the kill), whether each failure names a replica that
was lost, the time until a new request is served, until Serve has replaced the lost replicas (every
deployment at its replica count, none on a dead node), and until the surviving engine replicas hold no
request (a lost ingress replica's engine requests are aborted: ``cluster/caller_watch.py``), with how
many requests they aborted for a dead caller and the KV blocks they still hold then. tests/multinode
asserts the behaviour (UNAVAILABLE exactly for the calls that were on what was lost, the rest complete,
service whole again); this command measures the times.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import os
import signal
import time
from collections import Counter
from dataclasses import asdict, dataclass

import grpc
from ray.exceptions import RayActorError

from bench.local_cluster import (
    APP_NAME,
    ActorInfo,
    MultiNodeCluster,
    ReplicaGone,
    ReplicaStarting,
    add_command_flags,
    alive_actors,
    replica_stats,
    replicas_by_node,
    run_command,
)
from cluster.app import INGRESS_NAME, pool_name
from cluster.client import GenerationClient, make_request
from proto.binserve.v1 import generation_pb2 as pb

PROMPT = "Write a long story about a lighthouse keeper and the sea, with many chapters."


class Loss(str, enum.Enum):
    NODE = "node"
    """The GPU node of one engine replica (and of an ingress replica, where the layout puts one there)."""
    INGRESS = "ingress"
    """One ingress replica's process (one on the head, where there is one)."""


@dataclass(frozen=True)
class StreamEnd:
    code: str
    num_messages: int
    seconds_after_loss: float
    """When the stream ended, from the kill (negative: before it)."""
    names_lost_replica: bool
    """The error's message names an actor that was lost (always False for OK)."""
    num_tokens: int = 0
    """Tokens it received."""


@dataclass(frozen=True)
class LossReport:
    loss: str
    lost_actors: tuple[str, ...]
    """``ServeReplica:...`` class names of the actors that were killed."""
    streams: tuple[StreamEnd, ...]
    max_tokens: int
    num_streams_on_lost_engines: int
    """Streams running on a lost engine replica at the kill, through any ingress replica."""
    num_streams_of_lost_ingress_elsewhere: int
    """Streams through a lost ingress replica running on a surviving engine replica at the kill: those
    the surviving replicas must abort (``cluster/caller_watch.py``)."""
    seconds_until_served_again: float | None
    seconds_until_replicas_replaced: float | None
    seconds_until_engines_idle: float | None
    """From the loss until no surviving engine replica holds a request: the surviving streams have ended,
    and a lost ingress replica's engine requests have been aborted or have ended by themselves."""
    seconds_until_orphans_aborted: float | None
    """From the loss until the surviving engine replicas have aborted the requests of a lost ingress
    replica (None: it had none on them, or they were not all aborted)."""
    num_orphaned_requests: int
    """Engine requests the surviving replicas aborted because their caller died."""
    num_kv_blocks_held: int | None
    """KV blocks the engine replicas held once idle (0: nothing leaked); None if they never were."""
    probe_codes: dict[str, int]
    """How the new requests sent after the loss, until one was served, ended."""

    @property
    def codes(self) -> dict[str, int]:
        return dict(Counter(s.code for s in self.streams))

    @property
    def failed(self) -> tuple[StreamEnd, ...]:
        return tuple(s for s in self.streams if s.code != "OK")

    @property
    def num_streams_on_lost(self) -> int:
        """Streams that ran on what was lost: on a lost engine replica or through a lost ingress replica."""
        return self.num_streams_on_lost_engines + self.num_streams_of_lost_ingress_elsewhere

    @property
    def num_intact_streams(self) -> int:
        """OK streams with every one of their ``max_tokens`` tokens."""
        return sum(1 for s in self.streams if s.code == "OK" and s.num_tokens == self.max_tokens)

    @property
    def seconds_until_failed_calls_ended(self) -> float | None:
        return max((s.seconds_after_loss for s in self.failed), default=None)

    def as_json(self) -> dict:
        return {
            **asdict(self),
            "codes": self.codes,
            "seconds_until_failed_calls_ended": self.seconds_until_failed_calls_ended,
            "num_streams_on_lost": self.num_streams_on_lost,
            "num_intact_streams": self.num_intact_streams,
        }


class Stream:
    """One stream of forced tokens through the proxy, watched: its messages and tokens so far, how it ended.
    ``flowing`` is set once it has ``FLOWING_MESSAGES`` messages (it runs on a replica), or has ended."""

    FLOWING_MESSAGES = 3

    def __init__(self, request: pb.GenerateRequest) -> None:
        self.request = request
        self.num_messages = 0
        self.num_tokens = 0
        self.code = ""
        self.details = ""
        self.ended_s = 0.0
        self.flowing = asyncio.Event()

    async def run(self, client: GenerationClient, timeout_s: float) -> None:
        try:
            async for message in client.generate_stream(self.request, timeout_s=timeout_s):
                self.num_messages += 1
                self.num_tokens += len(message.token_ids)
                if self.num_messages >= self.FLOWING_MESSAGES:
                    self.flowing.set()
            self.code = "OK"
        except grpc.aio.AioRpcError as exc:
            self.code, self.details = exc.code().name, exc.details() or ""
        self.flowing.set()
        self.ended_s = time.monotonic()

    def end(self, since_s: float, lost_actor_ids: list[str]) -> StreamEnd:
        """How it ended, timed from ``since_s``; whether its error names one of ``lost_actor_ids``."""
        names_lost = self.code != "OK" and any(actor_id in self.details for actor_id in lost_actor_ids)
        return StreamEnd(self.code, self.num_messages, self.ended_s - since_s, names_lost, self.num_tokens)


def forced_streams(num_streams: int, max_tokens: int) -> list[Stream]:
    """Streams of ``max_tokens`` tokens each (EOS ignored), each prompt its own."""
    return [
        Stream(make_request(f"{i}. {PROMPT}", max_tokens=max_tokens, ignore_eos=True))
        for i in range(num_streams)
    ]


def victims(loss: Loss, head_node_id: str) -> list[ActorInfo]:
    """What ``loss`` kills: every actor on the GPU node of an engine replica (one with an ingress replica
    where there is one), or one ingress replica (one on the head where there is one)."""
    ingress = replicas_by_node(INGRESS_NAME)
    if loss is Loss.NODE:
        engine_nodes = sorted(n for n in replicas_by_node(pool_name(0)) if n != head_node_id)
        if not engine_nodes:
            raise ValueError("loss: no engine replica on a GPU node to lose")
        node_id = max(engine_nodes, key=lambda n: n in ingress)
        return [a for a in alive_actors() if a.node_id == node_id]
    return (ingress.get(head_node_id) or [a for replicas in ingress.values() for a in replicas])[:1]


@dataclass(frozen=True)
class OnLost:
    """The streams on what is about to be lost (the engine replicas count their calls by caller)."""

    num_on_lost_engines: int
    """On an engine replica of a lost node."""
    num_of_lost_ingress_elsewhere: int
    """Through a lost ingress replica, on a surviving engine replica."""
    survivors: tuple[ActorInfo, ...]
    """The surviving engine replicas."""
    num_orphaned_by_survivors: int
    """Requests they had aborted for a dead caller so far."""


def streams_on(lost: list[ActorInfo], loss: Loss) -> OnLost:
    """The streams on what ``lost`` is, before ``loss`` kills it."""
    lost_ids = {a.actor_id for a in lost}
    lost_node_ids = {a.node_id for a in lost} if loss is Loss.NODE else set()
    on_lost_engines = of_lost_ingress_elsewhere = num_orphaned = 0
    survivors = []
    for replica in [r for rs in replicas_by_node(pool_name(0)).values() for r in rs]:
        stats = replica_stats(replica)
        if lost_node_ids & set(stats.node_ids):
            on_lost_engines += sum(stats.num_requests_by_caller.values())
            continue
        survivors.append(replica)
        num_orphaned += stats.num_orphaned_requests
        of_lost_ingress_elsewhere += sum(
            n for caller, n in stats.num_requests_by_caller.items() if caller in lost_ids
        )
    return OnLost(on_lost_engines, of_lost_ingress_elsewhere, tuple(survivors), num_orphaned)


async def lose_under_load(
    address: str,
    nodes: MultiNodeCluster,
    loss: Loss,
    num_streams: int = 8,
    max_tokens: int = 1500,
    stagger_s: float = 0.25,
    recovery_timeout_s: float = 180.0,
) -> LossReport:
    """Start ``num_streams`` streams of ``max_tokens`` forced tokens; once each has 3 messages, lose what
    ``loss`` says; wait for every stream, then for the service and its replicas to be whole again."""
    streams = forced_streams(num_streams, max_tokens)
    async with GenerationClient(address) as client:

        async def stream(i: int) -> None:
            # Staggered: the replica router sees each stream before the next (a burst of equal requests
            # can land on one replica, and the loss would then take all or none of them).
            await asyncio.sleep(i * stagger_s)
            await streams[i].run(client, recovery_timeout_s)

        # A fair start: every replica up (a loss before may have left replacements starting), and routing
        # sees no work.
        await until_serve_healthy(time.monotonic(), recovery_timeout_s)
        await until_engines_idle(time.monotonic(), recovery_timeout_s)
        orphaned_before = sum(s.num_orphaned_requests for s in await asyncio.to_thread(engine_stats))
        replica_counts = Counter(a.class_name for a in await asyncio.to_thread(alive_actors))
        tasks = [asyncio.create_task(stream(i)) for i in range(num_streams)]
        await asyncio.wait_for(asyncio.gather(*(s.flowing.wait() for s in streams)), recovery_timeout_s)
        lost = await asyncio.to_thread(victims, loss, nodes.head_node_id)
        on_lost = await asyncio.to_thread(streams_on, lost, loss)
        if loss is Loss.NODE:
            lost_at_s = await asyncio.to_thread(nodes.remove, nodes.node_of(lost[0].node_id))
        else:
            lost_at_s = time.monotonic()
            os.kill(lost[0].pid, signal.SIGKILL)
        served_again = asyncio.create_task(_until_served(client, lost_at_s, recovery_timeout_s))
        replaced = asyncio.create_task(_until_replaced(lost, replica_counts, lost_at_s, recovery_timeout_s))
        aborted = asyncio.create_task(_until_orphans_aborted(on_lost, lost_at_s, recovery_timeout_s))
        await asyncio.gather(*tasks)
        served_again_s, probe_codes = await served_again
    idle_s = await until_engines_idle(lost_at_s, recovery_timeout_s)
    stats = await asyncio.to_thread(engine_stats)
    replaced_s, aborted_s = await replaced, await aborted
    lost_ids = [a.actor_id for a in lost]
    return LossReport(
        loss=loss.value,
        lost_actors=tuple(a.class_name for a in lost),
        streams=tuple(s.end(lost_at_s, lost_ids) for s in sorted(streams, key=lambda s: s.ended_s)),
        max_tokens=max_tokens,
        num_streams_on_lost_engines=on_lost.num_on_lost_engines,
        num_streams_of_lost_ingress_elsewhere=on_lost.num_of_lost_ingress_elsewhere,
        seconds_until_served_again=served_again_s,
        seconds_until_replicas_replaced=replaced_s,
        seconds_until_engines_idle=idle_s,
        seconds_until_orphans_aborted=aborted_s,
        num_orphaned_requests=sum(s.num_orphaned_requests for s in stats) - orphaned_before,
        num_kv_blocks_held=None if idle_s is None else kv_blocks_held(stats),
        probe_codes=probe_codes,
    )


async def _until_served(
    client: GenerationClient, since_s: float, timeout_s: float
) -> tuple[float | None, dict[str, int]]:
    """Seconds from the loss until a new request is served (asked from the loss on, while the streams
    that survived it still run), and how the requests sent until then ended."""
    codes: Counter[str] = Counter()
    while time.monotonic() - since_s < timeout_s:
        try:
            await client.generate(make_request("Hello", max_tokens=2), timeout_s=10)
            return time.monotonic() - since_s, dict(codes)
        except grpc.aio.AioRpcError as exc:
            codes[exc.code().name] += 1
            await asyncio.sleep(0.2)
    return None, dict(codes)


def engine_stats() -> list:
    """``EngineStats`` of every live engine replica (of pool 0)."""
    return [replica_stats(r) for rs in replicas_by_node(pool_name(0)).values() for r in rs]


def kv_blocks_held(stats: list) -> int:
    return sum(s.num_kv_blocks - s.num_free_kv_blocks for s in stats)


async def _until_orphans_aborted(on_lost: OnLost, since_s: float, timeout_s: float) -> float | None:
    """Seconds until the surviving engine replicas have aborted the requests of the lost ingress replica
    (``cluster/caller_watch.py``), or None if they had none or some were never aborted."""
    target = on_lost.num_orphaned_by_survivors + on_lost.num_of_lost_ingress_elsewhere
    while on_lost.num_of_lost_ingress_elsewhere and time.monotonic() - since_s < timeout_s:
        try:
            stats = await asyncio.to_thread(lambda: [replica_stats(r) for r in on_lost.survivors])
        except (RayActorError, ReplicaGone):  # a survivor lost since: the count cannot be reached
            return None
        if sum(s.num_orphaned_requests for s in stats) >= target:
            return time.monotonic() - since_s
        if not any(s.num_unfinished_requests for s in stats):  # some ended by themselves first
            return None
        await asyncio.sleep(0.2)
    return None


async def until_engines_idle(since_s: float, timeout_s: float) -> float | None:
    while time.monotonic() - since_s < timeout_s:
        try:
            stats = await asyncio.to_thread(engine_stats)
        # A replica lost a moment ago (its actor dead, or no longer found), or its replacement starting.
        except (RayActorError, ReplicaGone, ReplicaStarting):
            stats = None
        if stats is not None and not any(s.num_unfinished_requests for s in stats):
            return time.monotonic() - since_s
        await asyncio.sleep(0.2)
    return None


def is_serve_healthy() -> bool:
    """Whether Serve reports every deployment of the app healthy (each at its replica count, all up)."""
    from ray import serve

    app = serve.status().applications[APP_NAME]
    return all(d.status == "HEALTHY" for d in app.deployments.values())


async def until_serve_healthy(since_s: float, timeout_s: float) -> float | None:
    while time.monotonic() - since_s < timeout_s:
        if await asyncio.to_thread(is_serve_healthy):
            return time.monotonic() - since_s
        await asyncio.sleep(0.2)
    return None


async def _until_replaced(
    lost: list[ActorInfo], replica_counts: Counter[str], since_s: float, timeout_s: float
) -> float | None:
    """Seconds until no lost actor counts as alive (the GCS learns a node's death from missed health
    checks), every lost actor's kind runs as many live actors as before, and Serve reports every
    deployment healthy."""
    kinds, lost_ids = {a.class_name for a in lost}, {a.actor_id for a in lost}
    while time.monotonic() - since_s < timeout_s:
        alive = await asyncio.to_thread(alive_actors)
        live = Counter(a.class_name for a in alive if a.actor_id not in lost_ids)
        is_healthy = await asyncio.to_thread(is_serve_healthy)
        is_forgotten = not lost_ids & {a.actor_id for a in alive}
        if is_healthy and is_forgotten and all(live[kind] == replica_counts[kind] for kind in kinds):
            return time.monotonic() - since_s
        await asyncio.sleep(0.2)
    return None


# ---- the command ----------------------------------------------------------------------------------------

REPLICA_KINDS = {INGRESS_NAME: "an ingress replica", pool_name(0): "an engine replica"}


def what_was_lost(result: dict) -> str:
    """A row's first column: what ``result`` (one loss of a report) killed."""
    kinds = sorted({REPLICA_KINDS.get(name.rsplit(":", 1)[-1], name) for name in result["lost_actors"]})
    if result["loss"] == Loss.NODE.value:
        return f"a GPU node ({' and '.join(kinds)} on it)"
    return "an ingress replica's process"


def render(report: dict) -> str:
    """docs/RELIABILITY.md's table for a report of this command (a report from before streams were
    counted on what was lost says "not counted")."""

    def seconds(value: float | None) -> str:
        return "never" if value is None else f"{value:.1f} s"

    lines = [
        "| lost | streams on it at the kill: on its engine replica / through its ingress replica, elsewhere "
        "| streams OK (intact) / UNAVAILABLE / other | failed streams ended by | new requests until one "
        "is served | served again after | Serve replaced it after | engines idle after | engine requests "
        "aborted for a dead caller | KV blocks held then |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for loss in Loss:
        r = report[loss.value]
        codes = dict(r["codes"])
        ok, unavailable = codes.pop("OK", 0), codes.pop("UNAVAILABLE", 0)
        intact = sum(1 for s in r["streams"] if s["code"] == "OK" and s["num_tokens"] == r["max_tokens"])
        on_lost = (
            f"{r['num_streams_on_lost_engines']} / {r['num_streams_of_lost_ingress_elsewhere']}"
            if "num_streams_on_lost" in r
            else "not counted"
        )
        aborted = str(r.get("num_orphaned_requests", "not measured"))
        if r.get("seconds_until_orphans_aborted") is not None:
            aborted += f", after {r['seconds_until_orphans_aborted']:.1f} s"
        probes = ", ".join(f"{n} {code}" for code, n in sorted(r["probe_codes"].items())) or "none refused"
        lines.append(
            f"| {what_was_lost(r)} | {on_lost} | {ok} ({intact}) / {unavailable} / {sum(codes.values())} "
            f"| {seconds(r['seconds_until_failed_calls_ended'])} | {probes} "
            f"| {seconds(r['seconds_until_served_again'])} | {seconds(r['seconds_until_replicas_replaced'])} "
            f"| {seconds(r['seconds_until_engines_idle'])} | {aborted} "
            f"| {r.get('num_kv_blocks_held', 'not measured')} |"
        )
    lines.append(
        f"\n{report['num_streams']} streams of {report['node']['max_tokens']} forced tokens, "
        f"{report['date']}; load average {report['load_average_at_start']:.1f} at the start, "
        f"{report['load_average_at_end']:.1f} at the end"
        + "".join(f"; {name}={value}" for name, value in report.get("ray_env", {}).items())
        + "."
    )
    return "\n".join(lines)


def cmd_bench_node_loss(args: argparse.Namespace) -> int:
    from bench.local_cluster import RAY_ENV, deployed, multinode_cluster

    if args.render_only:
        with open(args.json) as f:
            report = json.load(f)
        for run in [report, *report.get("earlier_runs", [])]:
            print(render(run), end="\n\n")
        return 0

    def measure(report: dict, model_dir: str) -> None:
        report["num_streams"] = args.num_streams
        report["ray_env"] = RAY_ENV
        with multinode_cluster(num_gpu_nodes=2, cpus_per_gpu_node=2) as nodes, deployed(model_dir) as served:
            for loss in (Loss.NODE, Loss.INGRESS):  # the order of tests/multinode/test_node_loss.py
                result = asyncio.run(lose_under_load(served.address, nodes, loss, args.num_streams))
                report[loss.value] = result.as_json()
                print(
                    f"{loss.value}: {result.num_streams_on_lost} streams on what was lost, codes "
                    f"{result.codes}, {result.num_intact_streams} intact, failed calls ended by "
                    f"{result.seconds_until_failed_calls_ended} s, served again after "
                    f"{result.seconds_until_served_again} s, replicas replaced after "
                    f"{result.seconds_until_replicas_replaced} s, engines idle after "
                    f"{result.seconds_until_engines_idle} s",
                    flush=True,
                )
        if args.json and os.path.exists(args.json):  # the runs already there stay, newest first
            with open(args.json) as f:
                earlier = json.load(f)
            report["earlier_runs"] = [
                {k: v for k, v in earlier.items() if k != "earlier_runs"},
                *earlier.get("earlier_runs", []),
            ]

    return run_command(args, measure, render)


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser("node-loss", help="lose a node or an ingress replica under load")
    add_command_flags(p, scratch="out/node-loss")
    p.add_argument("--num-streams", type=int, default=8, help="streams in flight when the loss comes")
    p.add_argument("--render-only", action="store_true", help="only print the tables of the --json report")
    p.set_defaults(func=cmd_bench_node_loss)
