"""Conversations per second under one latency SLO, prefix caching on against off, on a served cluster (issue
22's "throughput at the same latency SLO" target, measured; ``bench/experiments/prefix_routing.py`` simulates
it).

    binserve bench conversation-capacity --model .models/smollm2-135m-instruct \\
        --serve-config deploy/serve-local.yaml --runs off@0.0133:6,off@0.03,on@0.03,on@0.045,off@0.045 \\
        --json docs/results/smollm2-135m-instruct/conversation_capacity.json

Each run serves the config on a fresh local cluster with ``cache.enable_prefix_caching`` on or off and replays
the conversations of ``binserve bench conversations`` (the same ShareGPT conversations, think times and seed;
``:N`` after a rate takes the first N of them) through gRPC, new conversations arriving as a Poisson process at
the run's rate. The SLO is ``--slo-ttft-multiple`` times the mean TTFT of caching off at its lowest rate, as in
the simulation; a setting's capacity is its highest rate whose run, and every lower rate's run, holds the SLO.
``--append`` adds runs to those already in ``--json``, so a sweep can be extended.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import yaml

from bench import write_report

TITLE = "Served conversations under one TTFT SLO: prefix caching on against off"
TARGET_RATIO = 1.5
"""Caching on's capacity at least this many times caching off's (issue 22)."""


def parse_runs(text: str) -> list[tuple[bool, float, int | None]]:
    """``on@0.03,off@0.02:6`` -> [(caching, conversations per second, number of conversations or None)]."""
    runs = []
    for item in text.split(","):
        setting, _, rest = item.strip().partition("@")
        rate, _, count = rest.partition(":")
        if setting not in ("on", "off") or not rate:
            raise ValueError(f"runs: each run is on@RATE or off@RATE[:CONVERSATIONS], got {item!r}")
        runs.append((setting == "on", float(rate), int(count) if count else None))
    return runs


def run_one(args: argparse.Namespace, caching: bool, rate: float, count: int | None) -> dict[str, Any]:
    from bench.conversation_routing import replay_on_fresh_cluster
    from bench.conversations import build_conversations, summarize_turns
    from workers.checkpoint import load_tokenizer

    workload = argparse.Namespace(
        **{**vars(args), "rate": rate, "num_conversations": count or args.num_conversations}
    )
    conversations = build_conversations(load_tokenizer(args.model), workload)
    raw = yaml.safe_load(Path(args.serve_config).read_text()) or {}
    turns, replay = replay_on_fresh_cluster(
        raw, args.model, conversations, "cache", enable_prefix_caching=caching
    )
    row = summarize_turns(turns)
    row.update(caching=caching, rate_per_s=rate, num_conversations=len(conversations), **replay)
    return row


def capacities(rows: list[dict[str, Any]], slo_multiple: float) -> dict[str, Any]:
    """The SLO (``slo_multiple`` x caching off's mean TTFT at its lowest rate) and, per setting, the highest
    rate holding it below the first rate that misses it, and that first miss."""
    from bench.experiments.harness import capacity_under_slo

    off = sorted((r for r in rows if not r["caching"]), key=lambda r: r["rate_per_s"])
    if not off:
        return {}
    slo_s = slo_multiple * off[0]["ttft_mean_s"]
    result: dict[str, Any] = {"slo_ttft_s": slo_s, "baseline_rate_per_s": off[0]["rate_per_s"]}
    for name, caching in (("on", True), ("off", False)):
        ttft_s = {r["rate_per_s"]: r["ttft_mean_s"] for r in rows if r["caching"] is caching}
        capacity, first_miss = capacity_under_slo(ttft_s, slo_s)
        result[name] = {"capacity_per_s": capacity or 0.0, "first_miss_per_s": first_miss}
    return result


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    cap = result.get("capacities") or {}
    if not cap or not cap["off"]["capacity_per_s"]:
        return []
    ratio = cap["on"]["capacity_per_s"] / cap["off"]["capacity_per_s"]
    return [
        {
            "target": f"conversations on `{result['params']['serve_config']}` (served): conversations/s under mean "
            f"TTFT <= {cap['slo_ttft_s']:.2f} s ({result['params']['slo_ttft_multiple']:g}x caching off's at "
            f"{cap['baseline_rate_per_s']:g}/s), caching on over off >= {TARGET_RATIO}x",
            "value": ratio,
            "threshold": TARGET_RATIO,
            "met": ratio >= TARGET_RATIO,
        }
    ]


def with_rows(path: str | None, params: dict[str, Any], rows: list[dict[str, Any]], append: bool) -> dict:
    existing = json.loads(Path(path).read_text()) if append and path and Path(path).is_file() else {}
    result = {"params": params, "rows": [*existing.get("rows", []), *rows], "meta": existing.get("meta", [])}
    result["capacities"] = capacities(result["rows"], params["slo_ttft_multiple"])
    result["targets"] = targets(result)
    return result


def cmd_bench_conversation_capacity(args: argparse.Namespace) -> int:
    from bench.experiments.harness import run_meta, this_command

    started_s = time.perf_counter()
    rows = []
    for caching, rate, count in parse_runs(args.runs):
        row = run_one(args, caching, rate, count)
        rows.append(row)
        print(
            f"caching {'on' if caching else 'off'} at {rate}/s ({row['num_conversations']} conversations): "
            f"mean TTFT {row['ttft_mean_s']:.2f} s, mean JCT {row['mean_jct_s']:.1f} s, "
            f"hit rate {row['hit_rate_tokens']:.1%}, load {row['load_average']}",
            flush=True,
        )
    params = {k: v for k, v in vars(args).items() if k != "func"}
    result = with_rows(args.json, params, rows, args.append)
    result["meta"].append(run_meta(this_command(), time.perf_counter() - started_s, None))
    for t in result["targets"]:
        print(f"{t['target']}: {t['value']:.2f} ({'met' if t['met'] else 'missed'})")
    write_report(args.json, result)
    return 0


def render(result: dict[str, Any]) -> str:
    from bench.experiments.harness import markdown_table

    cap = result["capacities"]
    p = result["params"]
    header = ["caching", "conversations/s", "conversations", "turns", "mean TTFT (s)", "mean JCT (s)"]
    header += ["hit rate (prompt tokens)", "output tokens/s", "holds the SLO", "load at start / end"]
    rows = [
        [
            "on" if r["caching"] else "off",
            r["rate_per_s"],
            r["num_conversations"],
            r["num_turns"],
            r["ttft_mean_s"],
            r["mean_jct_s"],
            r["hit_rate_tokens"],
            r["output_tokens_per_s"],
            "yes" if r["ttft_mean_s"] <= cap["slo_ttft_s"] else "no",
            f"{r['load_average']['start']} / {r['load_average']['end']}",
        ]
        for r in result["rows"]
    ]
    on, off = cap["on"], cap["off"]
    return "\n".join(
        [
            f"ShareGPT conversations of up to {p['max_turns']} turns (answers of at most {p['max_output_tokens']} "
            f"tokens, think time {p['think_s']} s, seed {p['seed']}), Poisson arrivals at each run's rate, "
            f"greedy, through gRPC on `{p['serve_config']}`, a fresh cluster per run, in this order. SLO: mean "
            f"TTFT <= {cap['slo_ttft_s']:.2f} s ({p['slo_ttft_multiple']:g}x caching off's at "
            f"{cap['baseline_rate_per_s']:g}/s).",
            "",
            markdown_table(header, rows),
            "",
            f"Capacity under the SLO: caching on {on['capacity_per_s']:g}/s (first miss: "
            f"{on['first_miss_per_s'] or 'none measured'}), caching off {off['capacity_per_s']:g}/s (first miss: "
            f"{off['first_miss_per_s'] or 'none measured'}).",
            "",
            "; ".join(
                f"*{m['machine']['cpu']}, {m['machine']['num_cores']} cores; {m['date']}; `{m['command']}`; "
                f"{m['duration_s']:.0f} s*"
                for m in result["meta"]
            ),
        ]
    )


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    from bench.conversations import add_workload_arguments

    p = bench_subparsers.add_parser(
        "conversation-capacity",
        help="served conversations per second under a TTFT SLO, prefix caching on against off",
    )
    p.add_argument("--model", required=True, help="checkpoint directory with a chat template")
    p.add_argument("--serve-config", default="deploy/serve-local.yaml", help="the Serve config served")
    p.add_argument(
        "--runs",
        required=True,
        help="comma-separated on@RATE or off@RATE[:N] (conversations per second; N: the first N conversations)",
    )
    p.add_argument(
        "--slo-ttft-multiple",
        type=float,
        default=2.0,
        help="SLO: this x caching off's mean TTFT at its lowest rate",
    )
    add_workload_arguments(p, num_conversations=12)
    p.add_argument("--append", action="store_true", help="keep the runs already in --json")
    p.add_argument("--json", help="write the report here")
    p.set_defaults(func=cmd_bench_conversation_capacity)
