"""``binserve bench served``: the served path against the engine alone, on the same requests, in one run.

    binserve bench served --model .models/tiny-llama --streams 8 32 64 --json docs/results/tiny-llama/served.json

``deploy/bench-served.yaml`` (one bin, one pool of one replica, ``pp_size`` 1, one torch thread,
``max_num_seqs`` 32, 512 MiB of KV; greedy) is served on a local Ray cluster, and the engine of the same
config is built in this process (its model in this process too, wherever the served replica runs its model:
``parallel.separate_model_process``). For each number of streams N, ``--pairs`` alternating pairs (the engine
first, then the served path; then the other way round):
- served: N callers each send ``--rounds`` streamed requests back to back (``bench.path``'s callers: gRPC
  ``GenerateStream`` and HTTP ``/v1/completions``, ``ignore_eos``, ``--max-tokens`` tokens each);
- the engine alone: the same requests (the same prompt tokens, greedy, forced lengths) with at most N in
  the engine at once, driven by ``bench.offline.run_engine`` in this thread.
Reported per N and API (medians over the pairs): output tokens/s of both and the ratio, tokens per streamed
chunk, the p50 gap between a request's streamed chunks against the engine alone's p50 step time.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from bench import write_report
from bench.experiments.harness import load_average, markdown_table, provenance, run_meta, target, this_command
from bench.offline import run_engine
from bench.path import PROMPT, StreamResult, run_level, stream_caller
from bench.request_stats import percentile
from bench.workload import WorkloadRequest
from pipeline.config_flags import positive_int

if TYPE_CHECKING:
    from cluster.local import ServeAddresses
    from pipeline.engine import Engine

DEFAULT_CONFIG = "deploy/bench-served.yaml"
NUM_CPUS = 4
"""Logical CPUs of the local Ray cluster: the replica 1, the ingress 0.5 (more than this machine's cores is fine)."""


@dataclass(frozen=True)
class ServedRun:
    api: str
    num_requests: int
    num_tokens: int
    num_chunks: int
    tokens_per_s: float
    p50_chunk_gap_s: float
    p50_ttft_s: float


@dataclass(frozen=True)
class EngineRun:
    num_requests: int
    num_tokens: int
    tokens_per_s: float
    p50_step_s: float


@dataclass(frozen=True)
class Pair:
    num_streams: int
    is_engine_first: bool
    engine: EngineRun
    served: list[ServedRun]
    load_average: float | None
    """When the pair ended."""


def engine_config(config_path: str, model_dir: str):  # -> pipeline.config.EngineConfig
    """The served application's engine config, with ``model_dir`` in it, as the engine alone runs it: its
    model in this process, wherever the served replica runs its own (``parallel.separate_model_process``)."""
    from cluster.config import AppConfig

    args = yaml.safe_load(Path(config_path).read_text())["applications"][0]["args"]
    engine = AppConfig.from_args({**args, "model": {**args["model"], "model_dir": model_dir}}).engine
    return dataclasses.replace(engine, parallel=dataclasses.replace(engine.parallel, separate_model_process=False))


def serves_model_apart(config_path: str) -> bool:
    """Whether the served replica runs its model in a stage actor of its own."""
    args = yaml.safe_load(Path(config_path).read_text())["applications"][0]["args"]
    return bool(args.get("parallel", {}).get("separate_model_process", False))


async def served_run(
    one: Callable[[], Awaitable[StreamResult]], api: str, num_streams: int, num_rounds: int
) -> ServedRun:
    results, makespan_s = await run_level(one, num_streams, 0.0, min_each=num_rounds)
    num_tokens = sum(r.num_tokens for r in results)
    return ServedRun(
        api=api,
        num_requests=len(results),
        num_tokens=num_tokens,
        num_chunks=sum(r.num_messages for r in results),
        tokens_per_s=num_tokens / makespan_s,
        p50_chunk_gap_s=percentile([g for r in results for g in r.gaps_s], 50),
        p50_ttft_s=percentile([r.ttft_s for r in results], 50),
    )


def engine_run(engine: Engine, request: WorkloadRequest, num_streams: int, num_rounds: int) -> EngineRun:
    done = run_engine(
        engine, [request] * (num_streams * num_rounds), max_num_running=num_streams, show_progress=False
    )
    return EngineRun(
        done["num_requests"], done["output_tokens"], done["output_tokens_per_s"], done["p50_step_s"]
    )


async def measure(
    args: argparse.Namespace,
    addresses: ServeAddresses,
    engine: Engine,
    request: WorkloadRequest,
    on_pair: Callable[[list[Pair]], None],
) -> list[Pair]:
    """The pairs; ``on_pair`` sees every pair so far after each one."""
    pairs = []
    async with (
        stream_caller("grpc", addresses, args.max_tokens) as grpc_one,
        stream_caller("http", addresses, args.max_tokens) as http_one,
    ):
        callers = {api: one for api, one in (("grpc", grpc_one), ("http", http_one)) if api in args.apis}
        for api, one in callers.items():  # warm: connections, the predictor, the path
            await served_run(one, api, 2, 1)
        engine_run(engine, request, 2, 1)
        for num_streams in args.streams:
            for i in range(args.pairs):
                is_engine_first = i % 2 == 0
                if is_engine_first:
                    alone = engine_run(engine, request, num_streams, args.rounds)
                served = [
                    await served_run(one, api, num_streams, args.rounds) for api, one in callers.items()
                ]
                if not is_engine_first:
                    alone = engine_run(engine, request, num_streams, args.rounds)
                pair = Pair(num_streams, is_engine_first, alone, served, load_average())
                print_pair(pair)
                pairs.append(pair)
                on_pair(pairs)
    return pairs


def print_pair(pair: Pair) -> None:
    served = "; ".join(
        f"{s.api} {s.tokens_per_s:,.0f} tokens/s ({s.tokens_per_s / pair.engine.tokens_per_s:.2f}x), "
        f"{s.num_tokens / s.num_chunks:.2f} tokens/chunk, gap p50 {1000 * s.p50_chunk_gap_s:.1f} ms"
        for s in pair.served
    )
    print(
        f"{pair.num_streams:3d} streams, {'engine first' if pair.is_engine_first else 'served first'}: engine "
        f"{pair.engine.tokens_per_s:,.0f} tokens/s, step p50 {1000 * pair.engine.p50_step_s:.1f} ms; {served}; "
        f"load {pair.load_average}",
        flush=True,
    )


def summarize(pairs: list[Pair]) -> list[dict[str, Any]]:
    """Per number of streams and API, the medians over its pairs (a ratio: the median of the pairs' ratios)."""
    levels = []
    for num_streams in dict.fromkeys(p.num_streams for p in pairs):
        at = [p for p in pairs if p.num_streams == num_streams]
        for api in [s.api for s in at[0].served]:
            runs = [(p.engine, next(s for s in p.served if s.api == api)) for p in at]
            ratios = [s.tokens_per_s / e.tokens_per_s for e, s in runs]
            levels.append(
                {
                    "num_streams": num_streams,
                    "api": api,
                    "num_pairs": len(runs),
                    "engine_tokens_per_s": statistics.median(e.tokens_per_s for e, _ in runs),
                    "served_tokens_per_s": statistics.median(s.tokens_per_s for _, s in runs),
                    "served_over_engine": statistics.median(ratios),
                    "served_over_engine_range": [min(ratios), max(ratios)],
                    "tokens_per_chunk": statistics.median(s.num_tokens / s.num_chunks for _, s in runs),
                    "p50_chunk_gap_s": statistics.median(s.p50_chunk_gap_s for _, s in runs),
                    "engine_p50_step_s": statistics.median(e.p50_step_s for e, _ in runs),
                    "gap_over_step": statistics.median(s.p50_chunk_gap_s / e.p50_step_s for e, s in runs),
                    "p50_ttft_s": statistics.median(s.p50_ttft_s for _, s in runs),
                }
            )
    return levels


# ---- targets (issue 21), judged per model ----------------------------------------------------------

TARGET_RATIOS: dict[str, tuple[float, tuple[int, ...]]] = {
    "tiny-llama": (0.8, (32, 64)),
    "smollm2-135m-instruct": (0.95, (8, 32)),
}
"""The model directory's name -> the least served / engine-alone ratio and the stream counts it is judged at."""
TARGET_GAP_OVER_STEP = 1.1


def targets(model: str, levels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per number of streams, the worse API: the ratio where ``TARGET_RATIOS`` names the model and streams,
    and the chunk gap against the engine's step everywhere."""
    found = []
    for num_streams in dict.fromkeys(lv["num_streams"] for lv in levels):
        at = [lv for lv in levels if lv["num_streams"] == num_streams]
        threshold, judged_at = TARGET_RATIOS.get(model, (None, ()))
        if num_streams in judged_at:
            found.append(
                target(
                    f"served output tokens/s >= {threshold}x the engine alone at {num_streams} streams "
                    "(median of the pairs, worse of gRPC and HTTP)",
                    min(lv["served_over_engine"] for lv in at),
                    threshold,
                )
            )
        found.append(
            target(
                f"p50 gap between streamed chunks <= {TARGET_GAP_OVER_STEP}x the engine alone's step at "
                f"{num_streams} streams (worse of gRPC and HTTP)",
                max(lv["gap_over_step"] for lv in at),
                TARGET_GAP_OVER_STEP,
                higher_is_better=False,
            )
        )
    return found


def cmd_bench_served(args: argparse.Namespace) -> int:
    import torch

    from cluster.local import serving_locally_at
    from workers.checkpoint import load_tokenizer
    from workers.llm import LLM

    if args.smoke:
        args.streams, args.pairs, args.rounds, args.max_tokens = [2], 1, 1, 8
    model_dir = str(Path(args.model).resolve())
    started_s, load_at_start = time.perf_counter(), load_average()
    config = engine_config(args.config, model_dir)
    torch.set_num_threads(config.parallel.torch_threads)
    engine = LLM(config).engine
    prompt_ids = tuple(load_tokenizer(model_dir)(PROMPT).input_ids)  # as the ingress tokenizes a prompt
    request = WorkloadRequest(PROMPT, prompt_ids, args.max_tokens)

    def write(pairs: list[Pair]) -> None:  # after every pair: a run cut off keeps the pairs it finished
        levels = summarize(pairs)
        result = {
            "model": Path(model_dir).name,
            "config": args.config,
            "max_tokens": args.max_tokens,
            "separate_model_process": serves_model_apart(args.config),
            "num_rounds": args.rounds,
            "levels": levels,
            "pairs": [asdict(p) for p in pairs],
            "targets": targets(Path(model_dir).name, levels),
            "meta": run_meta(this_command(), time.perf_counter() - started_s, load_at_start),
        }
        write_report(args.json, result)

    with serving_locally_at(args.config, model_dir, num_cpus=NUM_CPUS) as addresses:
        asyncio.run(measure(args, addresses, engine, request, write))
    return 0


# ---- the report's section (``binserve bench report`` renders docs/results/<model>/served.json) ----------

TITLE = "The served path against the engine alone: output tokens/s and streamed chunks"


def render(result: dict[str, Any]) -> str:
    rows = [
        [
            str(lv["num_streams"]),
            lv["api"],
            f"{lv['engine_tokens_per_s']:,.0f}",
            f"{lv['served_tokens_per_s']:,.0f}",
            f"{lv['served_over_engine']:.2f}x ({lv['served_over_engine_range'][0]:.2f}-"
            f"{lv['served_over_engine_range'][1]:.2f})",
            f"{lv['tokens_per_chunk']:.2f}",
            f"{1000 * lv['p50_chunk_gap_s']:.1f}",
            f"{1000 * lv['engine_p50_step_s']:.1f}",
            f"{lv['gap_over_step']:.2f}x",
            f"{1000 * lv['p50_ttft_s']:.0f}",
            str(lv["num_pairs"]),
        ]
        for lv in result["levels"]
    ]
    header = ["streams", "API", "engine alone tok/s", "served tok/s", "served / engine (range)"]
    header += ["tokens per chunk", "chunk gap p50 ms", "engine step p50 ms", "gap / step", "TTFT p50 ms"]
    header += ["pairs"]
    loads = ", ".join(str(p["load_average"]) for p in result["pairs"])
    where = (
        "its model in a stage actor of its own"
        if result.get("separate_model_process")
        else "its model in its own process"
    )
    intro = (
        f"`{result['config']}` served on a local Ray cluster (one bin, one pool of one replica, `pp_size` 1, one "
        f"torch thread, `max_num_seqs` 32, 512 MiB of KV; the replica runs {where}), against its engine alone, "
        "model included, in the benchmark's process "
        f"on the same requests: N callers each streaming {result['num_rounds']} request(s) of "
        f"{result['max_tokens']} forced greedy tokens back to back, and the engine with at most N requests in "
        "it at once. Medians over alternating served/engine pairs (the ratio's range over the pairs in "
        "brackets); the client runs on the same 2 cores as the served path, the engine alone has them to "
        "itself but uses one thread."
    )
    notes = f"Load average after each pair: {loads}."
    return "\n".join([intro, "", markdown_table(header, rows), "", notes, "", provenance(result)])


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser("served", help="the served path against the engine alone, in one run")
    p.add_argument("--model", required=True, help="the checkpoint directory, served and run alone")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="the Serve config (its model is --model)")
    p.add_argument("--streams", type=positive_int, nargs="+", default=[8, 32, 64], help="concurrent streams")
    p.add_argument("--apis", nargs="+", choices=("grpc", "http"), default=["grpc", "http"])
    p.add_argument("--max-tokens", type=positive_int, default=128, help="forced output tokens per request")
    p.add_argument("--rounds", type=positive_int, default=1, help="requests each caller sends back to back")
    p.add_argument(
        "--pairs", type=positive_int, default=3, help="alternating served/engine pairs per stream count"
    )
    p.add_argument("--smoke", action="store_true", help="2 streams, 1 pair, 8 tokens: try the code")
    p.add_argument("--json", help="write the result here (docs/results/<model>/served.json for the report)")
    p.set_defaults(func=cmd_bench_served)
