"""Conversations against a served cluster, once per replica routing rule (issue 22, item 3).

    binserve bench conversations --model .models/smollm2-135m-instruct \\
        --serve-config deploy/serve-conversations.yaml \\
        --routing least_cost,prefix_affinity,least_predicted_work,power_of_two \\
        --json docs/results/smollm2-135m-instruct/conversation_routing.json

The conversations of ``bench/conversations.py`` (the same ShareGPT ones, arrivals and think times),
replayed through the real gRPC proxy and ingress as chat messages: each turn resends the history with the
served model's own earlier answers, greedy, at most the turn's answer length. The config's pools run each
rule in turn (``pools.replica_routing`` overridden; a fresh local cluster each, so every run starts with
empty caches). Reported per rule: mean TTFT and mean JCT (all turns, and follow-up turns), the prefix hit
rate in prompt tokens (``usage.num_cached_prompt_tokens``), and whether the answers equal the first run's
(batching differs between runs, so greedy answers may too, and then the later turns differ).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import yaml

from bench.conversations import Conversation, Turn, summarize_turns
from bench.serve import ServedRequest, client_metrics
from cluster.client import GenerationClient, make_request

TITLE = "Conversations on 2 replicas: routing by cached prefix and predicted work"


async def replay_served(address: str, conversations: list[Conversation]) -> list[Turn]:
    """Every conversation to its last turn, or to a turn the ingress refuses (too long for the context)."""
    turns: list[Turn] = []
    async with GenerationClient(address) as client:
        await client.wait_ready()
        start_s = time.perf_counter()

        async def converse(c: int, conv: Conversation) -> None:
            await asyncio.sleep(max(0.0, start_s + conv.arrival_s - time.perf_counter()))
            history: list[tuple[str, str]] = []
            for k, user in enumerate(conv.user_messages):
                history.append(("user", user))
                request = make_request(messages=history, max_tokens=conv.answer_tokens[k], temperature=0.0)
                try:
                    timed = await client.generate_timed(request, stream=True, timeout_s=600)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() is grpc.StatusCode.INVALID_ARGUMENT:
                        return  # the history outgrew the context: the conversation ends here
                    raise
                response = timed.response
                metrics = dataclasses.replace(
                    client_metrics(ServedRequest(None, True, timed)),
                    num_cached_tokens=response.usage.num_cached_prompt_tokens,
                )
                turns.append(Turn(c, k, (), tuple(response.token_ids), metrics, 0, 0))
                history.append(("assistant", response.text))
                await asyncio.sleep(conv.think_s[k])

        await asyncio.gather(*(converse(c, conv) for c, conv in enumerate(conversations)))
    return sorted(turns, key=lambda t: (t.conversation, t.index))


def config_with(raw: dict[str, Any], section: str, **values: Any) -> dict[str, Any]:
    """A copy of a Serve config with ``values`` set in every application's ``args[section]``."""
    raw = yaml.safe_load(yaml.safe_dump(raw))  # a deep copy
    for app in raw.get("applications") or []:
        app.setdefault("args", {}).setdefault(section, {}).update(values)
    return raw


def replay_on_fresh_cluster(
    raw: dict[str, Any], model_dir: str, conversations: list[Conversation], section: str, **values: Any
) -> tuple[list[Turn], dict[str, Any]]:
    """Serve ``raw`` with ``values`` set in every application's ``args[section]`` on a fresh local cluster
    and replay ``conversations`` through gRPC: the turns, and the replay's seconds and load average."""
    from bench.experiments.harness import load_average
    from cluster.local import serving_locally_at

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "serve.yaml"
        path.write_text(yaml.safe_dump(config_with(raw, section, **values)))
        with serving_locally_at(path, model_dir) as addresses:
            before = replica_usage()
            load_before, started_s = load_average(), time.perf_counter()
            turns = asyncio.run(replay_served(addresses.grpc, conversations))
            replay_s = time.perf_counter() - started_s
            after = replica_usage()
    replay = {"start": load_before, "end": load_average()}
    replicas = [
        {field: value - before.get(pid, {}).get(field, 0) for field, value in usage.items()}
        for pid, usage in after.items()
    ]
    replicas.sort(key=lambda r: r["cpu_s"])
    return turns, {"replay_s": replay_s, "load_average": replay, "replicas": replicas}


def replica_usage() -> dict[int, dict[str, float]]:
    """Each engine replica's CPU seconds, requests, preemptions and evicted KV blocks so far, by process id:
    how the work was shared."""
    from bench.local_cluster import replica_stats, replicas_by_node
    from cluster.app import pool_name

    stats = [replica_stats(r) for rs in replicas_by_node(pool_name(0)).values() for r in rs]
    return {
        s.pids[0]: {
            "cpu_s": s.cpu_s,
            "num_requests": sum(s.num_requests_by_bin.values()),
            "num_preemptions": s.num_preemptions,
            "num_evicted_kv_blocks": s.num_evicted_kv_blocks,
        }
        for s in stats
    }


def run_routing(args: argparse.Namespace, conversations: list[Conversation]) -> dict[str, Any]:
    from bench.experiments.harness import load_average, run_meta, this_command

    raw = yaml.safe_load(Path(args.serve_config).read_text()) or {}
    started_s, load_at_start = time.perf_counter(), load_average()
    rows, answers = {}, {}
    for routing in args.routing.split(","):
        turns, replay = replay_on_fresh_cluster(
            raw, args.model, conversations, "pools", replica_routing=routing
        )
        row = summarize_turns(turns)
        row["mean_ttft_follow_up_s"] = _mean([t.metrics.ttft_s for t in turns if t.index > 0])
        row["mean_jct_follow_up_s"] = _mean([t.metrics.completion_s for t in turns if t.index > 0])
        row.update(replay)
        row["turns"] = [
            {
                "conversation": t.conversation,
                "turn": t.index,
                "prompt_tokens": t.metrics.num_prompt_tokens,
                "cached_tokens": t.metrics.num_cached_tokens,
                "output_tokens": t.metrics.num_output_tokens,
                "ttft_s": t.metrics.ttft_s,
                "jct_s": t.metrics.completion_s,
            }
            for t in turns
        ]
        rows[routing] = row
        answers[routing] = [(t.conversation, t.index, t.output_token_ids) for t in turns]
        shown = {k: v for k, v in row.items() if k != "turns" and ("tokens" not in k or "hit" in k)}
        print(routing, shown, flush=True)
    first = next(iter(answers.values()))
    return {
        "params": {k: v for k, v in vars(args).items() if k != "func"},
        "config": args.serve_config,
        "rows": rows,
        "answers_equal_first_run": {routing: a == first for routing, a in answers.items()},
        "meta": run_meta(this_command(), time.perf_counter() - started_s, load_at_start),
    }


def with_run(path: str | None, run: dict[str, Any], append: bool) -> dict[str, Any]:
    """The result file: its runs (kept with ``append``) and ``run``, judged on each rule's mean over them."""
    existing = json.loads(Path(path).read_text()) if append and path and Path(path).is_file() else {}
    runs = [*existing.get("runs", []), run]
    return {"runs": runs, "mean_rows": mean_rows(runs), "targets": targets(mean_rows(runs))}


MEANS = ("ttft_mean_s", "mean_jct_s", "hit_rate_tokens")


def mean_rows(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per rule, the mean over the runs (the same requests each time) of each run's mean TTFT, JCT, hit rate.
    A run marked ``excluded`` (a reason, set when something else disturbed it) is shown but not counted."""
    runs = [run for run in runs if not run.get("excluded")]
    if not runs:
        return {}
    rules = [r for r in runs[0]["rows"] if all(r in run["rows"] for run in runs)]
    return {r: {k: sum(run["rows"][r][k] for run in runs) / len(runs) for k in MEANS} for r in rules}


RULE = "least_cost"


def targets(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """least_cost against the best of the other rules: their lowest mean over its own (> 1: it beat all)."""
    others = [routing for routing in rows if routing != RULE]
    if RULE not in rows or not others:
        return []
    judged = []
    for key, name in (("ttft_mean_s", "mean TTFT"), ("mean_jct_s", "mean JCT")):
        ratio = min(rows[r][key] for r in others) / rows[RULE][key]
        judged.append(
            {
                "target": f"2 replicas, conversations: {RULE} beats {', '.join(others)} on {name} "
                "(best other / least_cost)",
                "value": ratio,
                "threshold": 1.0,
                "met": ratio > 1.0,
            }
        )
    return judged


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def render(result: dict[str, Any]) -> str:
    """The report's section: per run, one row per routing rule (same conversations); then the rules' means."""
    from bench.experiments.harness import markdown_table

    header = ["rule", "mean TTFT (s)", "mean JCT (s)", "hit rate (prompt tokens)"]
    means = [
        [rule, row["ttft_mean_s"], row["mean_jct_s"], row["hit_rate_tokens"]]
        for rule, row in result["mean_rows"].items()
    ]
    lines = [render_run(run, number) for number, run in enumerate(result["runs"], start=1)]
    counted = [run for run in result["runs"] if not run.get("excluded")]
    if len(result["runs"]) > 1:
        lines += [
            f"Each rule's mean over the {len(counted)} counted runs (what the targets judge):",
            "",
            markdown_table(header, means),
        ]
    return "\n\n".join(lines)


def render_run(run: dict[str, Any], number: int) -> str:
    from bench.experiments.harness import markdown_table, provenance

    rows = [
        [
            routing,
            row["num_turns"],
            row["ttft_mean_s"],
            row["mean_ttft_follow_up_s"],
            row["mean_jct_s"],
            row["mean_jct_follow_up_s"],
            row["hit_rate_tokens"],
            row["hit_rate_follow_up_tokens"],
            f"{row['load_average']['start']} / {row['load_average']['end']}",
            run["answers_equal_first_run"][routing],
        ]
        for routing, row in run["rows"].items()
    ]
    header = [
        "replica routing",
        "turns",
        "mean TTFT (s)",
        "follow-up mean TTFT (s)",
        "mean JCT (s)",
        "follow-up mean JCT (s)",
        "hit rate (prompt tokens)",
        "follow-up hit rate",
        "load at start / end",
        "answers as the first rule's",
    ]
    p = run["params"]
    return "\n".join(
        [
            f"Run {number}: {p['num_conversations']} ShareGPT conversations of up to {p['max_turns']} turns "
            f"(answers of at most {p['max_output_tokens']} tokens, Poisson arrivals at {p['rate']}/s, think "
            f"time {p['think_s']} s), greedy, through gRPC on `{run['config']}` (one pool of 2 replicas), "
            "a fresh cluster per rule, in this order:",
            "",
            markdown_table(header, rows),
            "",
            provenance(run),
            *(["", f"**Not counted:** {run['excluded']}"] if run.get("excluded") else []),
        ]
    )
