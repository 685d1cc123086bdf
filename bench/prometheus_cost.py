"""``binserve bench metrics-cost``: what exporting the binserve_* metrics costs in served throughput.

    binserve bench metrics-cost --config deploy/serve-local.yaml --model-dir .models/tiny-llama \\
        --num-requests 64 --rounds 2 --json out/metrics_cost.json

The same ShareGPT-shaped requests (all at once, output lengths forced) are served by the same Serve
config with ``metrics.enabled`` true and false, each on a fresh local cluster, alternating which goes
first in each round; output tokens per second are compared over the rounds' totals. Target: metrics cost
at most 2%.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path

import yaml

from bench import write_report


def _config_with_metrics(config_path: str, enabled: bool, directory: Path) -> Path:
    raw = yaml.safe_load(Path(config_path).read_text())
    for app in raw["applications"]:
        app.setdefault("args", {})["metrics"] = {"enabled": enabled}
    path = directory / f"serve-metrics-{'on' if enabled else 'off'}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def cmd_bench_metrics_cost(args: argparse.Namespace) -> int:
    from bench.serve import load_workload, replay, report
    from cluster.local import serving_locally

    requests = load_workload(
        args.model_dir, args.num_requests, args.seed, args.max_prompt_tokens, args.max_output_tokens
    )
    totals = {True: [0.0, 0.0], False: [0.0, 0.0]}  # enabled -> [output tokens, seconds]
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            order = (True, False) if round_index % 2 == 0 else (False, True)
            for enabled in order:
                config = _config_with_metrics(args.config, enabled, Path(tmp))
                with serving_locally(config, args.model_dir) as address:
                    results = asyncio.run(replay(address, requests, [True] * len(requests)))
                summary = report(results)["summary"]
                totals[enabled][0] += summary["output_tokens_per_s"] * summary["makespan_s"]
                totals[enabled][1] += summary["makespan_s"]
                rounds.append({"round": round_index, "metrics": enabled, **summary})
                print(
                    f"round {round_index}, metrics {'on ' if enabled else 'off'}: "
                    f"{summary['output_tokens_per_s']:.1f} output tokens/s",
                    flush=True,
                )
    on, off = (totals[e][0] / totals[e][1] for e in (True, False))
    result = {
        "command": "binserve bench metrics-cost",
        "load_average": os.getloadavg(),
        "num_requests": len(requests),
        "output_tokens_per_s_metrics_on": on,
        "output_tokens_per_s_metrics_off": off,
        "metrics_cost": 1.0 - on / off,
        "rounds": rounds,
    }
    print(f"metrics on {on:.1f} vs off {off:.1f} output tokens/s: cost {100 * result['metrics_cost']:+.1f}%")
    write_report(args.json, result)
    return 0


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser("metrics-cost", help="served throughput with and without metrics")
    p.add_argument("--config", default="deploy/serve-local.yaml", help="the Serve config to run")
    p.add_argument("--model-dir", required=True, help="the checkpoint to serve")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--max-output-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2, help="rounds of (on, off), alternating the order")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report here")
    p.set_defaults(func=cmd_bench_metrics_cost)
