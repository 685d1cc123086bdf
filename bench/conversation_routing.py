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


def config_with_routing(raw: dict[str, Any], routing: str) -> dict[str, Any]:
    raw = yaml.safe_load(yaml.safe_dump(raw))  # a deep copy
    for app in raw.get("applications") or []:
        pools = app.setdefault("args", {}).setdefault("pools", {})
        pools["replica_routing"] = routing
    return raw


def run_routing(args: argparse.Namespace, conversations: list[Conversation]) -> dict[str, Any]:
    from bench.experiments.harness import load_average, run_meta, this_command
    from cluster.local import serving_locally_at

    raw = yaml.safe_load(Path(args.serve_config).read_text()) or {}
    started_s, load_at_start = time.perf_counter(), load_average()
    rows, answers = {}, {}
    for routing in args.routing.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "serve.yaml"
            path.write_text(yaml.safe_dump(config_with_routing(raw, routing)))
            with serving_locally_at(path, args.model) as addresses:
                load_before, run_start_s = load_average(), time.perf_counter()
                turns = asyncio.run(replay_served(addresses.grpc, conversations))
        row = summarize_turns(turns)
        row["mean_ttft_follow_up_s"] = _mean([t.metrics.ttft_s for t in turns if t.index > 0])
        row["mean_jct_follow_up_s"] = _mean([t.metrics.completion_s for t in turns if t.index > 0])
        row["replay_s"] = time.perf_counter() - run_start_s
        row["load_average"] = {"start": load_before, "end": load_average()}
        rows[routing] = row
        answers[routing] = [(t.conversation, t.index, t.output_token_ids) for t in turns]
        print(routing, {k: v for k, v in row.items() if "tokens" not in k or "hit" in k}, flush=True)
    first = next(iter(answers.values()))
    return {
        "params": {k: v for k, v in vars(args).items() if k != "func"},
        "config": args.serve_config,
        "rows": rows,
        "answers_equal_first_run": {routing: a == first for routing, a in answers.items()},
        "targets": targets(rows),
        "meta": run_meta(this_command(), time.perf_counter() - started_s, load_at_start),
    }


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
    """The report's section: one row per routing rule, same conversations."""
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
            result["answers_equal_first_run"][routing],
        ]
        for routing, row in result["rows"].items()
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
        "answers as the first run",
    ]
    p = result["params"]
    return "\n".join(
        [
            f"{p['num_conversations']} ShareGPT conversations of up to {p['max_turns']} turns (Poisson "
            f"arrivals at {p['rate']}/s, think time {p['think_s']} s), greedy, through gRPC on "
            f"`{result['config']}` (one pool of 2 replicas), once per rule, runs in this order:",
            "",
            markdown_table(header, rows),
            "",
            provenance(result),
        ]
    )
