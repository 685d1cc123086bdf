"""Conversations across replicas (simulated): routing by cached prefix and predicted work, caching on and off.

    python -m bench.experiments.prefix_routing \
        --json docs/results/llama3-8b-h100-estimate/prefix_routing.json
    python -m bench.experiments.prefix_routing --quick --json /tmp/prefix_routing.json   # a minute

Multi-turn ShareGPT conversations (``bench.conversations.build_conversations``: the same conversations,
turn counts, answer lengths, Poisson arrivals and think times as the engine and cluster replays) replayed
in the simulator on one pool of 16 replicas (``--num-replicas``) under the GPU-shaped step-cost profile
(``--profile``), prefix caching on, once per replica routing rule: Serve's power-of-two, Ray Serve LLM's
prefix affinity, least predicted work and least cost (``cluster.router.RULES``, the served functions,
reports every ``routing_stats_period_s``). Then the best rule with caching off. Every row serves the same
turns. From the best rule's rows, the capacity with caching on and off under one TTFT SLO (``capacities``).
SmolLM2 on this CPU, one replica as ``binserve bench conversations`` serves (256 MiB of KV: 364 blocks):

    python -m bench.experiments.prefix_routing --profile profiles/cpu-smollm2-135m-instruct.json \
        --tokenizer .models/smollm2-135m-instruct --num-replicas 1 --num-blocks 364 --max-num-seqs 16 \
        --max-model-len 2048 --max-turns 6 --max-output-tokens 256 --max-message-chars 800 \
        --rules least_cost --num-conversations 300 --rates 0.02,0.04,0.06,0.08,0.1,0.12,0.15 \
        --json docs/results/smollm2-135m-instruct/prefix_routing.json

Token ids are synthetic: each conversation draws its tokens from its own seeded generator (ids from
``min_token_id``, clear of special tokens); turn k's prompt is turn k-1's prompt, then turn k-1's answer
exactly as the replica "sampled" it, then the new user message (its length under the tokenizer, plus
``template_tokens`` of chat markup). So every resent answer re-tokenizes exactly, which a real chat
template may not (``binserve bench conversations`` measures how often it does).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import multiprocessing
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.conversations import Conversation, build_conversations
from bench.experiments import harness
from bench.experiments.replica_routing import noisy_lengths
from bench.request_stats import summarize
from bench.sim.cost_model import StepCostModel
from bench.sim.simulator import ClusterSimulator, SimConfig, SimRequest
from bench.workload import poisson_arrivals
from cluster.config import PoolConfig
from cluster.predictor.distribution import DistributionTable
from pipeline.config import SchedulerConfig
from pipeline.engine import RequestMetrics
from workers.checkpoint import load_tokenizer


@dataclass(frozen=True)
class Params(harness.SimulatedWorkload):
    num_conversations: int = 1000
    max_turns: int = 8
    max_message_chars: int = 4000
    """User messages are cut to this (as ``binserve bench conversations --max-message-chars``)."""
    max_model_len: int = 8192
    """Llama-3-8B's context: a turn whose prompt and answer would not fit ends its conversation."""
    think_s: float = 1.0
    """Mean seconds between an answer and the next turn (exponential; ``binserve bench conversations``'
    default)."""
    template_tokens: int = 9
    """Chat markup around each user message (Llama 3's headers and end-of-turn tokens)."""
    min_token_id: int = 1000
    max_token_id: int = 120_000
    """Synthetic ids are drawn from [min_token_id, max_token_id): clear of Llama 3's special ids."""
    chunk_size: int = 512
    num_blocks: int = 25_000
    """Per replica, 16 tokens each: 400k tokens of KV, what an H100 holds beside Llama-3-8B's weights."""
    block_size: int = 16
    queue_order: str = "fcfs"
    spearman: float | None = 0.54
    """Predicted answer lengths of this Spearman correlation with the true ones (``noisy_lengths``, as
    the trained predictor reaches); None: the true lengths."""
    routing_stats_period_s: float = PoolConfig.routing_stats_period_s
    rates: tuple[float, ...] = (20.0, 40.0, 60.0, 80.0)
    """New conversations per second; the highest near saturation."""
    rules: tuple[str, ...] = ("power_of_two", "prefix_affinity", "least_predicted_work", "least_cost")
    slo_ttft_multiple: float = 2.0
    """The latency SLO of the capacity comparison: mean TTFT at most this multiple of caching off's at the
    lowest rate (the unloaded baseline; caching off meets it there by construction)."""


QUICK = dict(num_conversations=120, max_turns=4, rates=(10.0, 20.0))
"""``--quick``: a minute-sized run on the same code path."""


def conversation_requests(
    conversations: Sequence[Conversation], user_tokens: Sequence[Sequence[int]], params: Params
) -> list[SimRequest]:
    """Every turn of every conversation as a ``SimRequest``, a follow-up after the turn it follows. Turn k's
    prompt resends turn k-1's prompt and answer; a turn that would not fit ``max_model_len`` ends it."""
    requests: list[SimRequest] = []
    for c, (conv, users) in enumerate(zip(conversations, user_tokens, strict=True)):
        rng = random.Random(params.seed * 1_000_003 + c)

        def draw(n: int, rng: random.Random = rng) -> tuple[int, ...]:
            return tuple(rng.randrange(params.min_token_id, params.max_token_id) for _ in range(n))

        history: tuple[int, ...] = ()
        for k, (num_user, num_answer) in enumerate(zip(users, conv.answer_tokens, strict=True)):
            prompt = history + draw(num_user + params.template_tokens)
            if len(prompt) + num_answer > params.max_model_len:
                break
            answer = draw(num_answer)
            requests.append(
                SimRequest(
                    arrival_s=conv.arrival_s if k == 0 else conv.think_s[k - 1],
                    prompt_tokens=len(prompt),
                    output_tokens=num_answer,
                    prompt_token_ids=prompt,
                    output_token_ids=answer,
                    follows=None if k == 0 else len(requests) - 1,
                )
            )
            history = prompt + answer
    return requests


def load_conversations(params: Params) -> tuple[list[Conversation], list[list[int]]]:
    """The conversations (arrivals at 1/s; ``at_rate`` moves them) and each user message's token count."""
    tokenizer = load_tokenizer(params.tokenizer_dir)
    args = argparse.Namespace(
        num_conversations=params.num_conversations,
        rate=1.0,
        seed=params.seed,
        max_message_chars=params.max_message_chars,
        max_turns=params.max_turns,
        max_output_tokens=params.max_output_tokens,
        think_s=params.think_s,
    )
    conversations = build_conversations(tokenizer, args)
    user_tokens = [
        [len(ids) for ids in tokenizer(list(conv.user_messages), add_special_tokens=False).input_ids]
        for conv in conversations
    ]
    return conversations, user_tokens


def at_rate(requests: Sequence[SimRequest], rate_per_s: float, seed: int) -> list[SimRequest]:
    """The same turns with new conversations arriving at ``rate_per_s`` (Poisson, as at any rate)."""
    first_turns = [i for i, r in enumerate(requests) if r.follows is None]
    arrivals = dict(zip(first_turns, poisson_arrivals(len(first_turns), rate_per_s, seed), strict=True))
    return [dataclasses.replace(r, arrival_s=arrivals.get(i, r.arrival_s)) for i, r in enumerate(requests)]


def with_predictions(
    requests: Sequence[SimRequest], spearman: float | None, seed: int, max_tokens: int
) -> list[SimRequest]:
    """Predicted answer lengths, each capped at the turn's ``max_tokens`` (the replay sends every turn with
    ``max_output_tokens``), as the ingress caps the work estimate it gives the engine and the router, and
    with the shipped predictor's length distribution around each, as the ingress sends it (the router
    counts its mean)."""
    if spearman is None:
        return list(requests)
    predicted = noisy_lengths([r.output_tokens for r in requests], spearman, seed)
    table = DistributionTable.of_predictor(None)
    return [
        dataclasses.replace(
            r,
            predicted_output_tokens=min(p, max_tokens),
            output_length_distribution=None if table is None else table.for_prediction(p, max_tokens),
        )
        for r, p in zip(requests, predicted, strict=True)
    ]


def turn_summary(requests: Sequence[SimRequest], metrics: Sequence[RequestMetrics]) -> dict:
    """What a row reports: latency and throughput over every turn, the follow-ups' TTFT, the hit rate."""
    summary = summarize(metrics)
    follow_ups = [m for r, m in zip(requests, metrics, strict=True) if r.follows is not None]
    num_prompt = sum(m.num_prompt_tokens for m in metrics)
    num_cached = sum(m.num_cached_tokens for m in metrics)
    return {
        "num_turns": len(metrics),
        "mean_ttft_s": summary.mean_ttft_s,
        "p99_ttft_s": summary.p99_ttft_s,
        "mean_follow_up_ttft_s": sum(m.ttft_s for m in follow_ups) / len(follow_ups) if follow_ups else None,
        "mean_jct_s": summary.mean_jct_s,
        "p99_tbt_s": summary.p99_tbt_s,
        "output_tokens_per_s": summary.output_tokens_per_s,
        "hit_rate_tokens": num_cached / num_prompt if num_prompt else 0.0,
        "num_preemptions": sum(m.num_preemptions for m in metrics),
    }


def simulate(
    params: Params, cost_model: StepCostModel, rule: str, caching: bool, requests: Sequence[SimRequest]
) -> dict:
    scheduler = SchedulerConfig(
        policy="sarathi",
        max_num_seqs=params.max_num_seqs,
        chunk_size=params.chunk_size,
        queue_order=params.queue_order,
    )
    config = SimConfig(
        scheduler=scheduler,
        num_replicas=params.num_replicas,
        num_blocks=params.num_blocks,
        block_size=params.block_size,
        max_model_len=params.max_model_len,
        enable_prefix_caching=caching,
        replica_routing=rule,
        routing_stats_period_s=params.routing_stats_period_s,
        seed=params.seed,
    )
    metrics = ClusterSimulator(config, cost_model).run(requests)
    if len(metrics) != len(requests):
        raise RuntimeError(f"{rule}: {len(requests) - len(metrics)} turns did not finish")
    return turn_summary(requests, metrics)


def best_rule(rows: Sequence[dict], rate_per_s: float) -> str:
    """The rule of the least mean TTFT at ``rate_per_s`` (caching on)."""
    at = [r for r in rows if r["caching"] and r["rate_per_s"] == rate_per_s]
    return min(at, key=lambda r: r["mean_ttft_s"])["rule"]


_turns: list[SimRequest] = []
"""A worker process's copy of the turns (``_init_worker``), so each job does not pickle them again."""


def _init_worker(turns: list[SimRequest]) -> None:
    global _turns
    _turns = turns


def _simulate_job(params: Params, cost_model: StepCostModel, job: tuple[str, bool, float]) -> dict:
    rule, caching, rate = job
    started = time.time()
    row = {"rule": rule, "caching": caching, "rate_per_s": rate}
    row.update(simulate(params, cost_model, rule, caching, at_rate(_turns, rate, params.seed)))
    print(
        f"{rule}, caching {'on' if caching else 'off'}, {rate:g} conv/s: mean TTFT {row['mean_ttft_s']:.3f} s, "
        f"p99 TTFT {row['p99_ttft_s']:.3f} s, mean JCT {row['mean_jct_s']:.3f} s, hit rate "
        f"{row['hit_rate_tokens']:.1%}, {row['output_tokens_per_s']:.0f} tokens/s ({time.time() - started:.0f} s)",
        flush=True,
    )
    return row


def run(params: Params, processes: int = 1) -> dict:
    """Every rule with caching on at every rate, then the best rule with caching off; ``processes`` runs
    the simulations in parallel (each is deterministic, so the rows do not depend on it)."""
    cost_model = StepCostModel.load(params.profile)
    conversations, user_tokens = load_conversations(params)
    turns = with_predictions(
        conversation_requests(conversations, user_tokens, params),
        params.spearman,
        params.seed,
        params.max_output_tokens,
    )
    with multiprocessing.get_context("fork").Pool(processes, _init_worker, (turns,)) as pool:
        simulate_jobs = functools.partial(_simulate_job, params, cost_model)
        rows = pool.map(
            simulate_jobs, [(rule, True, rate) for rule in params.rules for rate in params.rates], 1
        )
        best = best_rule(rows, max(params.rates))
        rows += pool.map(simulate_jobs, [(best, False, rate) for rate in params.rates], 1)
    return {
        "params": asdict(params),
        "profile_source": cost_model.source,
        "num_conversations": len(conversations),
        "num_turns": len(turns),
        "num_follow_up_turns": sum(1 for t in turns if t.follows is not None),
        "mean_prompt_tokens": sum(t.prompt_tokens for t in turns) / len(turns),
        "mean_output_tokens": sum(t.output_tokens for t in turns) / len(turns),
        "best_rule": best,
        "rows": rows,
    }


# ---- the report's section (``binserve bench report`` renders docs/results/<model>/prefix_routing.json) ----

TITLE = "Conversations across replicas (simulated): routing by cached prefix and predicted work, caching on and off"
TARGET_RULE = "least_cost"


TARGET_CAPACITY_RATIO = 1.5
"""Caching on serves at least this many times the conversations/s of caching off under the same TTFT SLO."""


def capacities(result: dict) -> dict | None:
    """The best rule's capacity with caching on and off under one TTFT SLO: the highest rate up to which every
    grid rate keeps the mean TTFT within ``slo_ttft_multiple`` times caching off's at the lowest rate. None
    without caching-off rows. ``on_is_lower_bound``: caching on met the SLO at the highest rate tried."""
    p, best = result["params"], result["best_rule"]
    rows = {(r["caching"], r["rate_per_s"]): r for r in result["rows"] if r["rule"] == best}
    rates = sorted(p["rates"])
    if not all((False, rate) in rows and (True, rate) in rows for rate in rates):
        return None
    slo_s = p.get("slo_ttft_multiple", 2.0) * rows[(False, rates[0])]["mean_ttft_s"]

    def capacity(caching: bool) -> float | None:
        ttft_s = {rate: rows[(caching, rate)]["mean_ttft_s"] for rate in rates}
        return harness.capacity_under_slo(ttft_s, slo_s)[0]

    on, off = capacity(True), capacity(False)
    return {
        "rule": best,
        "slo_mean_ttft_s": slo_s,
        "on": on,
        "off": off,
        "on_is_lower_bound": on == rates[-1],
    }


def targets(result: dict) -> list[dict]:
    """Least cost's mean TTFT at the highest rate against the best other rule's there (>= 1.0x: no worse),
    with more than one rule; and the capacity with caching on over off under one TTFT SLO (``capacities``)."""
    p = result["params"]
    top = max(p["rates"])
    at = {r["rule"]: r for r in result["rows"] if r["caching"] and r["rate_per_s"] == top}
    found = []
    if TARGET_RULE in at and len(at) >= 2:
        others = min(r["mean_ttft_s"] for rule, r in at.items() if rule != TARGET_RULE)
        goal = (
            f"simulated prefix hits, {p['num_replicas']} replicas, {top:g} conversations/s: the best "
            "other rule's mean TTFT over least cost's >= 1.0 (least cost no worse)"
        )
        found.append(harness.target(goal, others / at[TARGET_RULE]["mean_ttft_s"], 1.0))
    cap = capacities(result)
    if cap is not None and cap["on"] is not None and cap["off"]:
        goal = (
            f"simulated conversations, {p['num_replicas']} replica(s), {Path(p['profile']).stem}: conversations/s "
            f"under mean TTFT <= {cap['slo_mean_ttft_s']:.2f} s ({p.get('slo_ttft_multiple', 2.0):g}x caching "
            f"off's at {min(p['rates']):g}/s), caching on over off >= {TARGET_CAPACITY_RATIO}x"
            + (" (on held the SLO at every rate tried: a lower bound)" if cap["on_is_lower_bound"] else "")
        )
        found.append(harness.target(goal, cap["on"] / cap["off"], TARGET_CAPACITY_RATIO))
    return found


def render(result: dict) -> str:
    p = result["params"]
    headers = [
        "rule",
        "prefix caching",
        "conversations/s",
        "mean TTFT (s)",
        "p99 TTFT (s)",
        "follow-up mean TTFT (s)",
        "mean JCT (s)",
        "hit rate (prompt tokens)",
        "output tokens/s",
    ]
    table = [
        [
            r["rule"],
            "on" if r["caching"] else "off",
            f"{r['rate_per_s']:g}",
            f"{r['mean_ttft_s']:.3f}",
            f"{r['p99_ttft_s']:.3f}",
            "–" if r["mean_follow_up_ttft_s"] is None else f"{r['mean_follow_up_ttft_s']:.3f}",
            f"{r['mean_jct_s']:.2f}",
            f"{r['hit_rate_tokens']:.1%}",
            f"{r['output_tokens_per_s']:.0f}",
        ]
        for r in result["rows"]
    ]
    predictions = "true" if p["spearman"] is None else f"synthetic (Spearman {p['spearman']:g})"
    text = (
        f"{p['num_replicas']} replicas in one pool, simulated under the step-cost profile `{Path(p['profile']).name}` "
        f"({result['profile_source']}). {result['num_conversations']} ShareGPT conversations of up to "
        f"{p['max_turns']} turns ({result['num_turns']} turns, {result['num_follow_up_turns']} follow-ups; prompts "
        f"{result['mean_prompt_tokens']:.0f} tokens on average with their history, answers "
        f"{result['mean_output_tokens']:.0f}, at most {p['max_output_tokens']}), Poisson arrivals of new "
        f"conversations, think time {p['think_s']:g} s on average, SARATHI (chunk {p['chunk_size']}, "
        f"{p['max_num_seqs']} sequences, {p['queue_order']}), {p['num_blocks']} KV blocks of {p['block_size']} "
        f"tokens per replica, predicted answer lengths {predictions}, reports every {p['routing_stats_period_s']:g} s. "
        "Token ids are synthetic and every resent answer is exactly the generated tokens (a real chat template "
        f"may re-tokenize it differently). Caching off: the best rule at the highest rate ({result['best_rule']}). "
        "What it says: docs/ROUTING.md."
    )
    parts = [text, harness.markdown_table(headers, table)]
    cap = capacities(result)
    if cap is not None:
        shown = {c: "none" if cap[c] is None else f"{cap[c]:g}/s" for c in ("on", "off")}
        parts.append(
            f"Under one latency SLO, mean TTFT <= {cap['slo_mean_ttft_s']:.2f} s ({p.get('slo_ttft_multiple', 2.0):g}x "
            f"caching off's at the lowest rate), {cap['rule']} holds up to {shown['on']} with caching on"
            + (" (every rate tried)" if cap["on_is_lower_bound"] else "")
            + f" and {shown['off']} with caching off (the grid's rates)."
        )
    if "meta" in result:
        parts.append(harness.provenance(result))
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=Params.profile)
    parser.add_argument("--num-conversations", type=int, default=Params.num_conversations)
    parser.add_argument("--rates", default=",".join(f"{r:g}" for r in Params.rates), help="conversations/s")
    parser.add_argument("--think-s", type=float, default=Params.think_s)
    parser.add_argument("--tokenizer", default=Params.tokenizer_dir, help="model directory measuring lengths")
    parser.add_argument(
        "--quick", action="store_true", help="a minute-sized run (120 conversations, 2 rates)"
    )
    parser.add_argument("--num-replicas", type=int, default=Params.num_replicas)
    parser.add_argument("--num-blocks", type=int, default=Params.num_blocks, help="KV blocks per replica")
    parser.add_argument("--max-num-seqs", type=int, default=Params.max_num_seqs)
    parser.add_argument("--max-model-len", type=int, default=Params.max_model_len)
    parser.add_argument("--max-turns", type=int, default=Params.max_turns)
    parser.add_argument("--max-output-tokens", type=int, default=Params.max_output_tokens)
    parser.add_argument("--max-message-chars", type=int, default=Params.max_message_chars)
    parser.add_argument(
        "--rules", default=",".join(Params.rules), help="replica routing rules, comma-separated"
    )
    parser.add_argument("--slo-ttft-multiple", type=float, default=Params.slo_ttft_multiple)
    parser.add_argument(
        "--seed", type=int, default=Params.seed, help="which conversations, their arrivals and predictions"
    )
    parser.add_argument("--processes", type=int, default=1, help="simulations run in parallel")
    parser.add_argument("--json", required=True, help="docs/results/MODEL/prefix_routing.json for the report")
    args = parser.parse_args()
    start_s, load_at_start = time.perf_counter(), harness.load_average()
    params = Params(
        profile=args.profile,
        num_conversations=args.num_conversations,
        rates=tuple(float(r) for r in args.rates.split(",")),
        think_s=args.think_s,
        tokenizer_dir=args.tokenizer,
        num_replicas=args.num_replicas,
        num_blocks=args.num_blocks,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        max_turns=args.max_turns,
        max_output_tokens=args.max_output_tokens,
        max_message_chars=args.max_message_chars,
        rules=tuple(r.strip() for r in args.rules.split(",")),
        slo_ttft_multiple=args.slo_ttft_multiple,
        seed=args.seed,
    )
    if args.quick:
        params = dataclasses.replace(params, **QUICK)
    harness.finish_module_run(
        sys.modules[__name__], run(params, args.processes), start_s, load_at_start, args.json
    )


if __name__ == "__main__":
    main()
