"""``binserve bench path``: what the serving path itself carries and costs, with a runner that costs nothing.

    binserve bench path --config deploy/bench-path.yaml --streams 1 32 256 --json out/path.json

The config's engine replicas run ``bench/path_runner.py``'s ``PathRunner`` (deterministic tokens at a
fixed step time, no model), so every figure is the machinery's: Serve's gRPC or HTTP proxy -> the ingress
(intake, predictor, router, detokenization, stop strings) -> the pool's handle -> the replica -> the driver.

For each API (gRPC ``GenerateStream``; HTTP ``/v1/completions`` with ``stream``) and each number of
concurrent streams, that many callers each send streamed requests of ``--max-tokens`` forced tokens
(``ignore_eos``) back to back for ``--duration-s``, then finish the request they are in. Reported:
- streamed output tokens per second (every request's tokens over the level's makespan);
- CPU seconds per 1,000 streamed tokens of each process (Serve's proxy, the ingress replica, the engine
  replica: their own CPU times, found through Ray's state API) and their sum; the client's apart;
- TTFT at the client (p50, p90) and what the path adds to the engine's (p50 minus one step);
- tokens per streamed message (1 when every token travels alone).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from bench import write_report
from bench.request_stats import percentile

if TYPE_CHECKING:
    from cluster.local import ServeAddresses

PROMPT = "Write a long story about a dragon who learns to cook, with several chapters and dialogue."
PROCESSES = {"proxy": "ProxyActor", "ingress": "ServeReplica:binserve:ingress"}
"""Ray actor class names of the measured processes; the engine replica's is ``ENGINE_CLASS``."""
ENGINE_CLASS = "ServeReplica:binserve:engine-pool-0"
FLOOR_IMPORT_PATH = "bench.serve_floor:build_app"
"""``--serve-floor``: the config's application replaced by Serve alone (``bench/serve_floor.py``)."""


@dataclass(frozen=True)
class StreamResult:
    ttft_s: float
    num_tokens: int
    num_messages: int
    """Streamed messages the tokens came in: fewer than the tokens where the replica coalesced them."""
    gaps_s: tuple[float, ...]
    """Seconds between consecutive token-carrying messages."""


@dataclass(frozen=True)
class Level:
    api: str
    num_streams: int
    num_requests: int
    num_tokens: int
    makespan_s: float
    tokens_per_s: float
    tokens_per_message: float
    p50_ttft_s: float
    p90_ttft_s: float
    ttft_added_s: float
    """p50 TTFT minus the runner's step time: what the path adds to the engine's first token."""
    cpu_s_per_1k_tokens: dict[str, float]
    """Per process (proxy, ingress, engine, and their ``sum``), and ``client`` apart."""
    cpu_us_per_token: float
    """The processes' sum (client excluded), microseconds per streamed token."""
    load_average: tuple[float, float, float]


@dataclass(frozen=True)
class EngineAlone:
    """The same requests (one round of them, all at once) on the engine in this process: no Serve."""

    num_streams: int
    tokens_per_s: float
    cpu_us_per_token: float


def engine_alone(app_args: dict[str, Any], model_dir: str, num_streams: int, max_tokens: int) -> EngineAlone:
    """What the served path adds to: the config's scheduler on the path runner, driven by ``Engine.generate``."""

    from bench.path_runner import PathRunnerConfig
    from cluster.config import AppConfig, parse_section
    from pipeline.request import SamplingParams
    from workers.checkpoint import load_tokenizer
    from workers.llm import build_engine

    args = dict(app_args)
    runner = parse_section(PathRunnerConfig, args.pop("path_runner", None), "path_runner")
    args["model"] = {**args["model"], "model_dir": model_dir}
    config = AppConfig.from_args(args).engine
    engine = build_engine(config, runner(config))
    prompt = tuple(load_tokenizer(model_dir)(PROMPT).input_ids)
    cpu_start_s, start_s = time.process_time(), time.perf_counter()
    done = engine.generate([prompt] * num_streams, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    cpu_s, elapsed_s = time.process_time() - cpu_start_s, time.perf_counter() - start_s
    num_tokens = sum(len(c.output_token_ids) for c in done)
    return EngineAlone(num_streams, num_tokens / elapsed_s, 1e6 * cpu_s / num_tokens)


def serve_pids() -> dict[str, int]:
    """PIDs of the proxy, ingress and engine replica actors of the application this process serves: its
    descendants whose title (``ray::CLASS``) names them (other Ray clusters on the host are not ours)."""
    import psutil

    classes = {**PROCESSES, "engine": ENGINE_CLASS}
    titles = {}
    for child in psutil.Process().children(recursive=True):
        try:
            titles[child.pid] = " ".join(child.cmdline())
        except psutil.Error:
            continue
    pids = {}
    for name, class_name in classes.items():
        found = [pid for pid, title in titles.items() if title.startswith(f"ray::{class_name}")]
        if len(found) != 1:
            raise RuntimeError(f"{name}: expected one ray::{class_name} process, found {len(found)}")
        pids[name] = found[0]
    return pids


def cpu_times_s(pids: dict[str, int]) -> dict[str, float]:
    import psutil

    times = {}
    for name, pid in {**pids, "client": os.getpid()}.items():
        cpu = psutil.Process(pid).cpu_times()
        times[name] = cpu.user + cpu.system
    return times


async def grpc_stream(client, max_tokens: int) -> StreamResult:
    from cluster.client import make_request

    arrivals_s, num_tokens = [time.perf_counter()], 0
    async for message in client.generate_stream(make_request(PROMPT, max_tokens=max_tokens, ignore_eos=True)):
        arrivals_s.append(time.perf_counter())
        num_tokens += len(message.token_ids)
    if num_tokens != max_tokens:
        raise RuntimeError(f"grpc: {num_tokens} tokens streamed, {max_tokens} asked for")
    return stream_result(arrivals_s, num_tokens)


def stream_result(arrivals_s: list[float], num_tokens: int) -> StreamResult:
    """From the send time and each token-carrying message's arrival."""
    gaps_s = tuple(b - a for a, b in itertools.pairwise(arrivals_s[1:]))
    return StreamResult(arrivals_s[1] - arrivals_s[0], num_tokens, len(arrivals_s) - 1, gaps_s)


async def http_stream(session, url: str, max_tokens: int) -> StreamResult:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0}
    body.update(stream=True, stream_options={"include_usage": True})
    arrivals_s, num_tokens = [time.perf_counter()], None
    async with session.post(f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                num_tokens = event["usage"]["completion_tokens"]
            else:
                arrivals_s.append(time.perf_counter())
    if num_tokens != max_tokens:
        raise RuntimeError(f"http: {num_tokens} tokens streamed, {max_tokens} asked for")
    return stream_result(arrivals_s, num_tokens)


async def run_level(
    one_stream: Callable[[], Awaitable[StreamResult]], num_streams: int, duration_s: float, min_each: int = 1
) -> tuple[list[StreamResult], float]:
    """``num_streams`` callers sending streams back to back until ``duration_s`` and ``min_each`` each;
    results and makespan."""
    start_s = time.perf_counter()
    deadline_s = start_s + duration_s

    async def caller() -> list[StreamResult]:
        results = [await one_stream()]
        while time.perf_counter() < deadline_s or len(results) < min_each:
            results.append(await one_stream())
        return results

    per_caller = await asyncio.gather(*(caller() for _ in range(num_streams)))
    return [r for results in per_caller for r in results], time.perf_counter() - start_s


@contextlib.asynccontextmanager
async def stream_caller(
    api: str, addresses: ServeAddresses, max_tokens: int
) -> AsyncIterator[Callable[[], Awaitable[StreamResult]]]:
    """A function that sends one streamed request of ``max_tokens`` forced tokens through ``api``'s proxy
    (``grpc``: ``GenerateStream``; ``http``: ``/v1/completions``) and times its messages."""
    import aiohttp

    from cluster.client import GenerationClient

    async with (
        GenerationClient(addresses.grpc) as client,
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
        ) as session,
    ):
        if api == "grpc":
            await client.wait_ready()

            def one() -> Awaitable[StreamResult]:
                return grpc_stream(client, max_tokens)
        else:

            def one() -> Awaitable[StreamResult]:
                return http_stream(session, addresses.http, max_tokens)

        yield one


async def measure(
    api: str, addresses, num_streams: int, args: argparse.Namespace, pids: dict[str, int], step_s: float
) -> Level:
    """One level; ``addresses``: the proxies' (``cluster.local.ServeAddresses``)."""
    async with stream_caller(api, addresses, args.max_tokens) as one:
        await run_level(one, min(num_streams, 4), 0.0)  # warm: connections, the predictor, the path
        before = cpu_times_s(pids)
        results, makespan_s = await run_level(one, num_streams, args.duration_s)
        after = cpu_times_s(pids)
    num_tokens = sum(r.num_tokens for r in results)
    cpu = {name: 1000 * (after[name] - before[name]) / num_tokens for name in after}
    cpu["sum"] = sum(v for name, v in cpu.items() if name != "client")
    ttfts = [r.ttft_s for r in results]
    return Level(
        api=api,
        num_streams=num_streams,
        num_requests=len(results),
        num_tokens=num_tokens,
        makespan_s=makespan_s,
        tokens_per_s=num_tokens / makespan_s,
        tokens_per_message=num_tokens / sum(r.num_messages for r in results),
        p50_ttft_s=percentile(ttfts, 50),
        p90_ttft_s=percentile(ttfts, 90),
        ttft_added_s=percentile(ttfts, 50) - step_s,
        cpu_s_per_1k_tokens=cpu,
        cpu_us_per_token=1000 * cpu["sum"],
        load_average=os.getloadavg(),
    )


def print_level(level: Level) -> None:
    cpu = level.cpu_s_per_1k_tokens
    print(
        f"{level.api:4s} {level.num_streams:4d} streams: {level.tokens_per_s:9.0f} tokens/s, "
        f"{level.tokens_per_message:5.1f} tokens/message, TTFT p50 {1000 * level.p50_ttft_s:7.1f} ms; "
        f"CPU s per 1k tokens: proxy {cpu['proxy']:.3f} ingress {cpu['ingress']:.3f} engine "
        f"{cpu['engine']:.3f} sum {cpu['sum']:.3f} ({level.cpu_us_per_token:.0f} us/token; client "
        f"{cpu['client']:.3f}); load {level.load_average[0]:.2f}",
        flush=True,
    )


def _model_dir(args: argparse.Namespace, scratch: Path) -> str:
    if args.model_dir is not None:
        return args.model_dir
    from workers.tiny_model import make_tiny_model

    return str(make_tiny_model(scratch / "tiny-llama", seed=0))  # seeded: the same checkpoint every run


def cmd_bench_path(args: argparse.Namespace) -> int:
    from cluster.local import serving_locally_at

    raw = yaml.safe_load(Path(args.config).read_text())
    step_s = raw["applications"][0]["args"]["path_runner"]["step_s"]
    started_s, load_at_start = time.time(), os.getloadavg()
    levels: list[Level] = []
    alone: list[EngineAlone] = []
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = _model_dir(args, Path(scratch))
        app_args = raw["applications"][0]["args"]
        config_path = args.config
        if args.serve_floor:  # the same deployment names and resources, nothing of binserve inside
            raw["applications"][0]["import_path"] = FLOOR_IMPORT_PATH
            config_path = Path(scratch) / "serve-floor.yaml"
            config_path.write_text(yaml.safe_dump(raw))
        else:
            alone = [engine_alone(app_args, model_dir, n, args.max_tokens) for n in args.streams]
        for a in alone:
            print(
                f"engine alone {a.num_streams:4d} streams: {a.tokens_per_s:9.0f} tokens/s, "
                f"{a.cpu_us_per_token:.1f} us CPU per token",
                flush=True,
            )
        with serving_locally_at(config_path, model_dir, num_cpus=args.num_cpus) as addresses:
            pids = serve_pids()
            for num_streams in args.streams:
                for api in args.apis:
                    level = asyncio.run(measure(api, addresses, num_streams, args, pids, step_s))
                    print_level(level)
                    levels.append(level)
    run = {
        "label": args.label,
        "command": "binserve bench path " + " ".join(sys.argv[3:]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started_s)),
        "load_average_start": load_at_start,
        "load_average_end": os.getloadavg(),
        "config": args.config,
        "serve_floor": args.serve_floor,
        "step_s": step_s,
        "max_tokens": args.max_tokens,
        "duration_s": args.duration_s,
        "levels": [asdict(level) for level in levels],
        "engine_alone": [asdict(a) for a in alone],
    }
    if args.json is not None:
        write_report(args.json, with_run(args.json, run))
    return 0


# ---- the report's section (``binserve bench report`` renders docs/results/<model>/path.json) ------------

FLOOR_NOTE = (
    " (Serve's floor: `bench/serve_floor.py` in place of binserve, the same two streaming hops with "
    "nothing of binserve in them)"
)
TITLE = "The serving path alone: streamed tokens/s and CPU per token with a zero-cost runner"
TARGET_TOKENS_PER_S = 20_000
TARGET_CPU_US_PER_TOKEN = 50.0
TARGET_STREAMS = 256


def with_run(path: str, run: dict[str, Any]) -> dict[str, Any]:
    """The result file's runs with ``run`` added (replacing one with the same label), and its targets
    judged on the newest run."""
    existing = json.loads(Path(path).read_text()) if Path(path).is_file() else {"runs": []}
    runs = [r for r in existing["runs"] if r["label"] is None or r["label"] != run["label"]] + [run]
    judged = [r for r in runs if not r.get("serve_floor")]  # the floor is a yardstick, not binserve
    return {"runs": runs, "targets": targets(judged[-1]) if judged else []}


def targets(run: dict[str, Any]) -> list[dict[str, Any]]:
    at = [lv for lv in run["levels"] if lv["num_streams"] == TARGET_STREAMS]
    if not at:
        return []
    tokens_per_s = min(lv["tokens_per_s"] for lv in at)
    cpu_us = max(lv["cpu_us_per_token"] for lv in at)
    return [
        {
            "target": f">= {TARGET_TOKENS_PER_S:,} streamed tokens/s at {TARGET_STREAMS} streams (gRPC and HTTP)",
            "value": tokens_per_s,
            "threshold": TARGET_TOKENS_PER_S,
            "met": tokens_per_s >= TARGET_TOKENS_PER_S,
        },
        {
            "target": f"<= {TARGET_CPU_US_PER_TOKEN:.0f} us CPU per streamed token, summed over proxy, ingress "
            f"and engine replica, at {TARGET_STREAMS} streams",
            "value": cpu_us,
            "threshold": TARGET_CPU_US_PER_TOKEN,
            "met": cpu_us <= TARGET_CPU_US_PER_TOKEN,
        },
    ]


def render(result: dict[str, Any]) -> str:
    from bench.experiments.harness import markdown_table

    rows, engine_notes = [], []
    for run in result["runs"]:
        for lv in run["levels"]:
            cpu = lv["cpu_s_per_1k_tokens"]
            rows.append(
                [
                    run["label"] or "-",
                    lv["api"],
                    str(lv["num_streams"]),
                    f"{lv['tokens_per_s']:,.0f}",
                    f"{lv['tokens_per_message']:.1f}",
                    f"{1000 * lv['p50_ttft_s']:.1f}",
                    f"{1000 * lv['ttft_added_s']:.1f}",
                    *(f"{1000 * cpu[name]:.0f}" for name in ("proxy", "ingress", "engine")),
                    f"{lv['cpu_us_per_token']:.0f}",
                    f"{lv['load_average'][0]:.1f}",
                ]
            )
    header = ["run", "API", "streams", "tokens/s", "tokens/message", "TTFT p50 ms", "TTFT added ms"]
    header += ["proxy us/token", "ingress us/token", "engine us/token", "sum us/token", "load"]
    for run in result["runs"]:
        if run.get("engine_alone"):
            figures = ", ".join(
                f"{a['num_streams']} streams {a['tokens_per_s']:,.0f} tokens/s and {a['cpu_us_per_token']:.0f} us"
                for a in run["engine_alone"]
            )
            rows_note = (
                f"- {run['label']}: the engine alone (the same requests, once, in one process): {figures}"
            )
            engine_notes.append(rows_note)
    notes = [
        f"- {run['label'] or '-'}{' (code: ' + run['code'] + ')' if run.get('code') else ''}"
        f"{FLOOR_NOTE if run.get('serve_floor') else ''}: "
        f"`{run['command']}`, {run['date_utc']} UTC, step {1000 * run['step_s']:.0f} ms, "
        f"{run['max_tokens']} tokens per request, load average {run['load_average_start'][0]:.1f} at the "
        f"start and {run['load_average_end'][0]:.1f} at the end"
        for run in result["runs"]
    ]
    intro = (
        "Serve's proxy -> ingress -> engine pool -> driver, with `bench/path_runner.py`'s runner (deterministic "
        "tokens at a fixed step time, no model) in the one engine replica (`deploy/bench-path.yaml`): every "
        "figure is the serving machinery's. CPU is each process's own (user + system) per streamed token; "
        "'TTFT added' is the client's p50 TTFT minus one engine step (with 32 and 256 streams it includes the "
        "queue of that many requests sent at once). The load column is the 1-minute load average when the "
        "level ended (this 2-core machine is shared)."
    )
    return "\n".join([intro, "", markdown_table(header, rows), "", *notes, *engine_notes])


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser("path", help="the serving path's ceiling and CPU per token, no model")
    p.add_argument("--config", default="deploy/bench-path.yaml", help="a Serve config with a path runner")
    p.add_argument("--model-dir", help="the tokenizer's checkpoint; default: the tiny model, made here")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 32, 256], help="concurrent streams")
    p.add_argument("--apis", nargs="+", choices=("grpc", "http"), default=["grpc", "http"])
    p.add_argument("--max-tokens", type=int, default=128, help="forced output tokens per request")
    p.add_argument("--duration-s", type=float, default=10.0, help="callers start requests until then")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    p.add_argument(
        "--serve-floor",
        action="store_true",
        help="serve bench/serve_floor.py instead (Serve's proxy and two streaming hops, nothing of "
        "binserve): the floor binserve's figures compare with",
    )
    p.add_argument(
        "--label", help="a name for this run (before, after): a result file keeps one run per label"
    )
    p.add_argument(
        "--json", help="add the run to this result file (docs/results/tiny-llama/path.json for the report)"
    )
    p.set_defaults(func=cmd_bench_path)
