"""``binserve bench neighbour``: how much the engine alone slows when the other core is busy.

    binserve bench neighbour --model .models/smollm2-135m-instruct \\
        --json docs/results/smollm2-135m-instruct/neighbour.json

The served path (proxy, ingress, the replica's Serve loop) needs CPU beside the engine; on a 2-core machine it
can only take it from the core the engine does not use. This measures what that costs the engine by itself:
``binserve bench served``'s engine-alone run (the same config, request, stream counts and forced lengths),
pinned to CPU 0, with CPU 1 idle and with a neighbour process pinned to CPU 1, alternating (idle first, then
the neighbour first). Neighbours: a Python busy loop (the interpreter's own work, little memory) and a Python
loop churning a large dict (allocation and memory traffic, nearer a Ray process). No Ray, nothing served.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from bench import reporting
from bench.experiments.harness import load_average, markdown_table, provenance, run_meta, this_command
from pipeline.config_flags import positive_int

NEIGHBOURS: dict[str, str] = {
    "python busy loop": "while True: pass",
    "python dict churn": (
        "import random\nd = {}\nwhile True:\n    d[random.random()] = [0] * 50\n    len(d) > 200000 and d.clear()"
    ),
}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from bench.offline import run_engine
    from bench.path import PROMPT
    from bench.served import DEFAULT_CONFIG, engine_config
    from bench.workload import WorkloadRequest
    from workers.llm import LLM

    if len(os.sched_getaffinity(0)) < 2:
        raise ValueError("this machine gives the process fewer than 2 CPUs: nothing to measure")
    engine_cpu, neighbour_cpu = sorted(os.sched_getaffinity(0))[:2]
    started_s, load_at_start = time.perf_counter(), load_average()
    config = engine_config(DEFAULT_CONFIG, args.model)
    torch.set_num_threads(config.parallel.torch_threads)
    os.sched_setaffinity(0, {engine_cpu})
    llm = LLM(config)
    request = WorkloadRequest(PROMPT, tuple(llm.encode(PROMPT)), args.max_tokens)
    run_engine(llm.engine, [request] * 2, show_progress=False)  # warm

    def once(num_streams: int, neighbour: str | None) -> float:
        process = None
        if neighbour is not None:
            process = subprocess.Popen([sys.executable, "-c", NEIGHBOURS[neighbour]])
            os.sched_setaffinity(process.pid, {neighbour_cpu})
            time.sleep(0.5)
        try:
            done = run_engine(llm.engine, [request] * num_streams, show_progress=False)
        finally:
            if process is not None:
                process.terminate()
                process.wait()
        return done["output_tokens_per_s"]

    runs = []
    for num_streams in args.streams:
        for i in range(args.pairs):
            order = [None, *NEIGHBOURS] if i % 2 == 0 else [*NEIGHBOURS, None]
            for neighbour in order:
                tokens_per_s = once(num_streams, neighbour)
                runs.append(
                    {
                        "num_streams": num_streams,
                        "pair": i,
                        "neighbour": neighbour,
                        "tokens_per_s": tokens_per_s,
                    }
                )
                print(
                    f"{num_streams} streams, {neighbour or 'other core idle'}: {tokens_per_s:,.1f} tokens/s",
                    flush=True,
                )
    report = {
        "params": {k: v for k, v in vars(args).items() if k != "func"},
        "runs": runs,
        "ratios": ratios(runs),
        "meta": run_meta(this_command(), time.perf_counter() - started_s, load_at_start),
    }
    for row in report["ratios"]:
        print(f"{row['num_streams']} streams, {row['neighbour']}: {row['median_ratio']:.3f} of idle (median)")
    return report


def ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per stream count and neighbour: each pair's tokens/s over the same pair's idle run; their median."""
    rows = []
    for num_streams in dict.fromkeys(r["num_streams"] for r in runs):
        at = [r for r in runs if r["num_streams"] == num_streams]
        idle = {r["pair"]: r["tokens_per_s"] for r in at if r["neighbour"] is None}
        for neighbour in NEIGHBOURS:
            pair_ratios = [r["tokens_per_s"] / idle[r["pair"]] for r in at if r["neighbour"] == neighbour]
            rows.append(
                {
                    "num_streams": num_streams,
                    "neighbour": neighbour,
                    "idle_tokens_per_s": statistics.median(idle.values()),
                    "median_ratio": statistics.median(pair_ratios),
                    "ratios": pair_ratios,
                }
            )
    return rows


TITLE = "The engine alone with the other core busy"


def render(result: dict[str, Any]) -> str:
    p = result["params"]
    header = [
        "streams",
        "neighbour on the other core",
        "engine alone, idle neighbour (tokens/s)",
        "busy / idle (median)",
        "pairs",
    ]
    rows = [
        [
            r["num_streams"],
            r["neighbour"],
            r["idle_tokens_per_s"],
            r["median_ratio"],
            ", ".join(f"{x:.3f}" for x in r["ratios"]),
        ]
        for r in result["ratios"]
    ]
    return "\n".join(
        [
            f"`binserve bench served`'s engine-alone run ({p['max_tokens']} forced tokens a request, "
            "`deploy/bench-served.yaml`'s engine), pinned to one CPU, with the other CPU idle and with a neighbour "
            f"process pinned to it, {p['pairs']} alternating pairs per stream count. The served path needs that "
            "other core: this is what its mere presence costs the engine.",
            "",
            markdown_table(header, rows),
            "",
            provenance(result),
        ]
    )


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser("neighbour", help="the engine alone with the other core idle and busy")
    p.add_argument("--model", required=True, help="the checkpoint directory")
    p.add_argument(
        "--streams", type=positive_int, nargs="+", default=[8, 32], help="requests in the engine at once"
    )
    p.add_argument("--max-tokens", type=positive_int, default=128, help="forced output tokens per request")
    p.add_argument("--pairs", type=positive_int, default=3, help="alternating pairs per stream count")
    p.add_argument(
        "--json", help="write the result here (docs/results/<model>/neighbour.json for the report)"
    )
    p.set_defaults(func=reporting(run))
