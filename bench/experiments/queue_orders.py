"""Queue orders on the real engine with the step capped by a TBT SLO (issue 25, item 3).

    binserve bench exp queue_orders --model .models/smollm2-135m-instruct --size real   # ~20 min, idle machine

Where length awareness pays: the batch is capped, so a queue forms. Here the cap is the TBT SLO. Every running
decode waits for the whole step, so the step's token budget (``chunk_size``) is the lever. A short burst at the
start measures the step cost (seconds = a + b x tokens carried); the budget is the most tokens whose step stays
under ``budget_headroom`` x the SLO, and ``max_num_seqs`` is half of it, so at least half of every step is left
for prefill chunks while the decodes are full. A burst under FCFS then measures capacity (requests/s), and
Poisson arrivals at each ``loads`` multiple of it replay the same requests under FCFS and each order, told the
exact lengths or the trained predictor's. Runs alternate their order between repeats (and between loads), so a
drift in the machine's load does not favour one order.

Slowdown is a request's JCT over its own service time: what it would take alone on an idle engine at the
measured step cost (its prompt in budget-sized chunks, then one step per further output token). Length classes
are terciles of the true output length.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from bench.experiments import harness
from bench.replay import replay
from bench.request_stats import summarize
from bench.workload import DEFAULT_LABELS, WorkloadRequest, poisson_arrivals, with_arrivals
from pipeline.config import SchedulerConfig
from pipeline.engine import RequestMetrics

TITLE = "Queue orders under a TBT SLO: FCFS, SSJF, bounded SSJF and HRRN"
LENGTH_CLASSES = ("short", "medium", "long")
TARGET_LOAD = 0.9
PROBE_OUTPUT_TOKENS = 12
"""The step-cost probe's answers are cut to this: a few decode steps of each size are enough."""


@dataclass(frozen=True)
class Params(harness.EngineWorkload):
    num_requests: int = 32
    max_output_tokens: int = 256
    tbt_slo_s: float = 0.15
    budget_headroom: float = 0.8
    """The budget's step must cost at most this share of the SLO by the fitted cost: room for noise at p99."""
    max_chunk_size: int = 256
    """The budget when the step cost barely grows with the tokens it carries (a tiny model)."""
    chunk_size: int = 0
    """The step's token budget; 0: chosen from the step cost measured at the start. Fix it where the machine's
    load at the start would pick it (a loaded machine's steps are slower, so its measured budget is smaller)."""
    max_num_seqs: int = 0
    """Most requests running at once; 0: half the budget."""
    loads: tuple[float, ...] = (0.7, 0.9, 1.1)
    """Arrival rates as multiples of the capacity the burst under FCFS measured."""
    orders: tuple[str, ...] = ("ssjf", "ssjf_bounded", "hrrn")
    repeats: int = 1
    checkpoint_json: str = ""
    """Where set, the result so far is written here after every run: a run cut short keeps what it measured."""
    kv_cache_bytes: int = 256 * 2**20
    """Room for every running request's whole context on SmolLM2, so no run preempts."""


SIZES = {
    "full": Params(num_requests=48),
    "smoke": Params(num_requests=8, max_prompt_tokens=64, max_output_tokens=24, loads=(TARGET_LOAD,)),
    # SmolLM2 with its own lengths: 2 repeats x 7 runs of 32 requests at 0.9x, about 20 minutes on an idle
    # machine. The budget is the one SmolLM2's step cost on an idle machine here (~49 ms + 3.5 ms per token)
    # gives at 80% of the 150 ms SLO: 20 tokens, 10 sequences.
    "real": Params(
        labels=str(DEFAULT_LABELS),
        num_requests=32,
        max_prompt_tokens=128,
        max_output_tokens=128,
        loads=(TARGET_LOAD,),
        repeats=2,
        chunk_size=20,
        max_num_seqs=10,
    ),
}


# ---- the step's budget ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StepCost:
    """Seconds a step takes as a line in the tokens it carries (prefill and decode alike)."""

    base_s: float
    token_s: float

    def step_s(self, num_tokens: int) -> float:
        return self.base_s + self.token_s * num_tokens

    def budget_tokens(self, step_limit_s: float, max_tokens: int) -> int:
        """The most tokens a step may carry and still cost at most ``step_limit_s`` (at least 2: a decode and
        a prefill chunk)."""
        if self.token_s <= 0:
            return max_tokens
        return max(2, min(max_tokens, math.floor((step_limit_s - self.base_s) / self.token_s)))


def fit_step_cost(step_tokens: Sequence[int], step_times_s: Sequence[float]) -> StepCost:
    if len(set(step_tokens)) < 2:
        raise ValueError(
            f"step_tokens: need steps of at least two sizes to fit a line, got {set(step_tokens)}"
        )
    slope, intercept = statistics.linear_regression(step_tokens, step_times_s)
    return StepCost(base_s=intercept, token_s=slope)


def service_s(num_prompt_tokens: int, num_output_tokens: int, chunk_size: int, cost: StepCost) -> float:
    """A request's time alone on an idle engine: its prompt in budget-sized chunks (the last one also gives
    the first token), then one single-token step per further output token."""
    num_chunks = max(1, math.ceil(num_prompt_tokens / chunk_size))
    last_chunk = num_prompt_tokens - (num_chunks - 1) * chunk_size
    prefill_s = (num_chunks - 1) * cost.step_s(chunk_size) + cost.step_s(last_chunk)
    return prefill_s + (num_output_tokens - 1) * cost.step_s(1)


# ---- per length class ------------------------------------------------------------------------------


def length_classes(output_tokens: Sequence[int]) -> list[str]:
    """Each request's tercile of true output length (by rank; ties keep workload order)."""
    order = sorted(range(len(output_tokens)), key=lambda i: output_tokens[i])
    classes = [""] * len(output_tokens)
    for rank, i in enumerate(order):
        classes[i] = LENGTH_CLASSES[rank * len(LENGTH_CLASSES) // len(output_tokens)]
    return classes


def mean_slowdown_by_class(
    records: Sequence[RequestMetrics], classes: Sequence[str], chunk_size: int, cost: StepCost
) -> dict[str, float]:
    slowdowns: dict[str, list[float]] = {c: [] for c in LENGTH_CLASSES}
    for r, c in zip(records, classes, strict=True):
        alone_s = service_s(r.num_prompt_tokens, r.num_output_tokens, chunk_size, cost)
        slowdowns[c].append(r.completion_s / alone_s)
    return {c: statistics.fmean(s) if s else math.nan for c, s in slowdowns.items()}


# ---- the runs ---------------------------------------------------------------------------------------


def run(params: Params, predictor: harness.PredictorChoice) -> dict[str, Any]:
    start_s, load_at_start = time.perf_counter(), harness.load_average()
    engines = harness.Engines(params.model_dir, kv_cache_bytes=params.kv_cache_bytes)
    workload = harness.sharegpt_workload(engines.tokenizer, params)
    cost, probe = _measure_step_cost(engines, workload, params)
    measured_budget = cost.budget_tokens(params.budget_headroom * params.tbt_slo_s, params.max_chunk_size)
    chunk_size = params.chunk_size or measured_budget
    max_num_seqs = params.max_num_seqs or max(1, chunk_size // 2)
    fcfs = SchedulerConfig(policy="sarathi", chunk_size=chunk_size, max_num_seqs=max_num_seqs)
    burst = summarize(replay(engines.engine(fcfs), workload, desc="queue orders capacity").metrics)
    # Predicted work in seconds for hrrn and the wait bound: each token of work costs its request about a step.
    step_s = cost.step_s(chunk_size)
    estimates = harness.length_estimates(workload, predictor)
    runs = [("fcfs", None)] + [(o, e) for o in params.orders for e in estimates]
    true_tokens = [r.output_tokens for r in workload]
    classes = length_classes(true_tokens)
    rows = []

    def result() -> dict[str, Any]:
        table = averaged(rows)
        return {
            "experiment": "queue_orders",
            "title": TITLE,
            "params": asdict(params),
            "predictor": predictor.note,
            "prediction_quality": {
                e.source: harness.prediction_quality(true_tokens, e.output_tokens)
                for e in estimates
                if e.source != "oracle"
            },
            "step_cost": {**asdict(cost), **probe, "budget_tokens": measured_budget},
            "chunk_size": chunk_size,
            "max_num_seqs": max_num_seqs,
            "service_s_per_token": step_s,
            "capacity_per_s": burst.requests_per_s,
            "capacity_p99_tbt_s": burst.p99_tbt_s,
            "workload": {
                "num_requests": len(workload),
                "mean_prompt_tokens": statistics.fmean(len(r.prompt_token_ids) for r in workload),
                "mean_output_tokens": statistics.fmean(true_tokens),
                "class_mean_output_tokens": {
                    c: statistics.fmean(n for n, k in zip(true_tokens, classes, strict=True) if k == c)
                    for c in LENGTH_CLASSES
                },
            },
            "runs": rows,
            "rows": table,
            "targets": targets(table),
        }

    def checkpoint() -> None:
        if params.checkpoint_json:
            meta = harness.run_meta(harness.this_command(), time.perf_counter() - start_s, load_at_start)
            harness.write_json(params.checkpoint_json, {**result(), "meta": meta})

    checkpoint()  # the budget and capacity, before any run
    for load_index, load in enumerate(params.loads):
        for repeat in range(params.repeats):
            arrivals = poisson_arrivals(len(workload), load * burst.requests_per_s, params.seed + repeat)
            timed = with_arrivals(workload, arrivals)
            for order, estimate in runs[:: -1 if (load_index * params.repeats + repeat) % 2 else 1]:
                config = SchedulerConfig(
                    policy="sarathi",
                    chunk_size=chunk_size,
                    max_num_seqs=max_num_seqs,
                    queue_order=order,
                    service_s_per_token=step_s,
                )
                lengths = "exact" if estimate is None or estimate.source == "oracle" else "predicted"
                load_at_start = harness.load_average()
                predicted = list(estimate.output_tokens) if estimate else None
                measured = replay(engines.engine(config), timed, predicted=predicted, desc=f"{load} {order}")
                rows.append(
                    {
                        "load": load,
                        "repeat": repeat,
                        "order": order,
                        "lengths": None if estimate is None else lengths,
                        **_run_figures(measured.metrics, classes, chunk_size, cost),
                        "load_average": load_at_start,
                    }
                )
                checkpoint()
    return result()


def _measure_step_cost(
    engines: harness.Engines, workload: list[WorkloadRequest], params: Params
) -> tuple[StepCost, dict[str, Any]]:
    """A burst of the first few requests at a generous budget: steps from a full prefill chunk down to a few
    decodes give the line's two points."""
    probe = SchedulerConfig(policy="sarathi", chunk_size=64, max_num_seqs=32)
    requests = [replace(r, output_tokens=min(r.output_tokens, PROBE_OUTPUT_TOKENS)) for r in workload[:8]]
    measured = replay(engines.engine(probe), requests, desc="queue orders step cost")
    tokens = [prefill + decode for prefill, decode, _, _ in measured.features]
    return fit_step_cost(tokens, measured.step_times_s), {
        "num_steps": len(tokens),
        "min_tokens": min(tokens),
        "max_tokens": max(tokens),
    }


def _run_figures(
    records: list[RequestMetrics], classes: Sequence[str], chunk_size: int, cost: StepCost
) -> dict[str, Any]:
    s = summarize(records)
    return {
        "mean_jct_s": s.mean_jct_s,
        "p99_jct_s": s.p99_jct_s,
        "mean_ttft_s": s.mean_ttft_s,
        "p99_ttft_s": s.p99_ttft_s,
        "p99_tbt_s": s.p99_tbt_s,
        "mean_slowdown": mean_slowdown_by_class(records, classes, chunk_size, cost),
    }


FIGURES = ("mean_jct_s", "p99_jct_s", "mean_ttft_s", "p99_ttft_s", "p99_tbt_s")


def averaged(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (load, order, lengths): the repeats' mean of every figure, and the changes in mean and
    p99 JCT against FCFS at the same load (negative is better); for predicted lengths also the share of the
    exact lengths' mean-JCT cut that the prediction keeps."""
    with_fcfs = {r["load"] for r in runs if r["order"] == "fcfs"}  # a run cut short may lack it
    runs = [r for r in runs if r["load"] in with_fcfs]
    keys = list(dict.fromkeys((r["load"], r["order"], r["lengths"]) for r in runs))
    rows = []
    for load, order, lengths in keys:
        group = [r for r in runs if (r["load"], r["order"], r["lengths"]) == (load, order, lengths)]
        row = {"load": load, "order": order, "lengths": lengths, "num_repeats": len(group)}
        row |= {f: statistics.fmean(r[f] for r in group) for f in FIGURES}
        row["mean_slowdown"] = {
            c: statistics.fmean(r["mean_slowdown"][c] for r in group) for c in LENGTH_CLASSES
        }
        rows.append(row)
    by_key = {(r["load"], r["order"], r["lengths"]): r for r in rows}
    for r in rows:
        base = by_key[(r["load"], "fcfs", None)]
        r["mean_jct_change"] = r["mean_jct_s"] / base["mean_jct_s"] - 1
        r["p99_jct_change"] = r["p99_jct_s"] / base["p99_jct_s"] - 1
    for r in rows:
        exact = by_key.get((r["load"], r["order"], "exact"))
        r["share_of_oracle_gain"] = (
            harness.share_of_gain(-r["mean_jct_change"], -exact["mean_jct_change"])
            if r["lengths"] == "predicted" and exact
            else None
        )
    return rows


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's three bounds at 0.9x load, judged on the order whose predicted lengths cut mean JCT most;
    each carries that order's share of the oracle's gain (not measured where no such run was made)."""
    candidates = [r for r in rows if r["load"] == TARGET_LOAD and r["lengths"] == "predicted"]
    best = min(candidates, key=lambda r: r["mean_jct_change"], default=None)
    if best is None:
        best = {"order": "any order", "mean_jct_change": None, "p99_jct_change": None}
    where = f" ({best['order']}, predicted lengths, {TARGET_LOAD}x load)"
    share = best.get("share_of_oracle_gain")
    cut = None if best["mean_jct_change"] is None else -best["mean_jct_change"]
    found = [
        harness.target("Mean JCT >= 25% lower than FCFS" + where, cut, 0.25),
        harness.target(
            "p99 JCT no worse than FCFS" + where, best["p99_jct_change"], 0.0, higher_is_better=False
        ),
        harness.target(">= 70% of the exact lengths' mean-JCT cut" + where, share, 0.7),
    ]
    return [{**t, "share_of_oracle_gain": share} for t in found]


# ---- report -------------------------------------------------------------------------------------------


def render(result: dict[str, Any]) -> str:
    p, w, c = result["params"], result["workload"], result["step_cost"]
    header = [
        "load", "order", "lengths", "mean JCT (s)", "vs FCFS", "p99 JCT (s)", "vs FCFS", "p99 TBT (ms)",
        "slowdown short / medium / long", "share of exact gain",
    ]  # fmt: skip
    rows = [
        [
            f"{r['load']:g}x",
            r["order"],
            r["lengths"] or "–",
            r["mean_jct_s"],
            f"{r['mean_jct_change']:+.1%}",
            r["p99_jct_s"],
            f"{r['p99_jct_change']:+.1%}",
            r["p99_tbt_s"] * 1e3,
            " / ".join(harness.fmt(r["mean_slowdown"][k]) for k in LENGTH_CLASSES),
            "–" if r["share_of_oracle_gain"] is None else f"{r['share_of_oracle_gain']:.0%}",
        ]
        for r in result["rows"]
    ]
    quality = "; ".join(
        f"{name}: Spearman {harness.fmt(q['spearman'], 2)}, mean absolute error {q['mae_tokens']:.0f} tokens"
        for name, q in result["prediction_quality"].items()
    )
    classes = ", ".join(f"{k} {n:.0f}" for k, n in w["class_mean_output_tokens"].items())
    loads = sorted({r["load_average"] for r in result["runs"] if r["load_average"] is not None})
    return "\n\n".join(
        [
            f"{harness.workload_text(p, w['num_requests'])}; mean prompt {w['mean_prompt_tokens']:.0f} tokens, "
            f"mean output {w['mean_output_tokens']:.0f} (per length class: {classes}). "
            f"Step cost measured at the start ({c['num_steps']} steps of {c['min_tokens']}-{c['max_tokens']} "
            f"tokens): {c['base_s'] * 1e3:.0f} ms + {c['token_s'] * 1e3:.2f} ms per token. "
            + _budget_text(result)
            + " Capacity (a burst under FCFS): "
            f"{result['capacity_per_s']:.3f} requests/s at p99 TBT {result['capacity_p99_tbt_s'] * 1e3:.0f} ms; "
            "arrivals Poisson at each load times it, "
            f"{p['repeats']} repeat(s), run order alternated between loads and repeats. `hrrn` and the wait bound "
            f"price predicted work at {result['service_s_per_token'] * 1e3:.0f} ms per token (one budget step); "
            f"`ssjf` ages at 30 s. Lengths: {result['predictor']}"
            + (f" ({quality})" if quality else "")
            + ". Slowdown: JCT over the request's time alone on the engine at the step cost measured at the start."
            + (f" Load average at the runs' starts: {loads[0]:g}-{loads[-1]:g}." if loads else ""),
            harness.markdown_table(header, rows),
            harness.provenance(result),
        ]
    )


def _budget_text(result: dict[str, Any]) -> str:
    p, c = result["params"], result["step_cost"]
    slo = f"p99 TBT <= {p['tbt_slo_s'] * 1e3:.0f} ms"
    chosen = f"`chunk_size` {result['chunk_size']}, `max_num_seqs` {result['max_num_seqs']}, `sarathi`"
    if p.get("chunk_size"):
        return (
            f"For {slo} the budget is fixed at {chosen} (an idle machine's step cost here at "
            f"{p['budget_headroom']:.0%} of the SLO); the cost measured at the start would have allowed "
            f"{c['budget_tokens']} tokens: under load every step is slower."
        )
    return (
        f"For {slo} the step may cost {p['budget_headroom']:.0%} of it by the measured cost: {chosen} "
        "(half the budget for running requests, so prefill chunks keep room)."
    )


def plot(result: dict[str, Any], path: str) -> None:
    fig, (ax,) = harness.new_figure(width_in=7.0)
    loads = list(dict.fromkeys(r["load"] for r in result["rows"]))
    labels = list(dict.fromkeys((r["order"], r["lengths"]) for r in result["rows"] if r["order"] != "fcfs"))
    width = 0.8 / max(1, len(labels))
    for i, (order, lengths) in enumerate(labels):
        by_load = {r["load"]: r for r in result["rows"] if (r["order"], r["lengths"]) == (order, lengths)}
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(loads))]
        ax.bar(xs, [by_load[x]["mean_jct_change"] * 100 for x in loads], width, label=f"{order} ({lengths})")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(loads)), [f"{x:g}x capacity" for x in loads])
    ax.set_ylabel("mean JCT vs FCFS (%)")
    ax.set_title("Queue orders under a TBT SLO")
    ax.legend(fontsize=7)
    harness.save_figure(fig, path)
