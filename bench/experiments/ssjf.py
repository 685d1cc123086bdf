"""Experiment 1, SSJF vs FCFS (Qiu et al., 2024): mean and p99 job completion time on the real engine.

    binserve bench exp ssjf             # writes docs/results/MODEL/ssjf.json and .png

Three batching modes (none: one request at a time; dynamic; continuous SARATHI), each run FCFS, SSJF
with oracle lengths and SSJF with the trained predictor's lengths, all on the same ShareGPT requests
(the predictor reads the real prompt text) with the same arrivals. Only the admission order differs.

The default load is a burst: every request arrives at t=0. That produces queueing in every mode with
one workload (a Poisson rate that loads batch-1 serving would leave continuous batching idle), the
runs are finite (no warm-up to discard), and the gap in mean completion time is purely the service
order. ``rate_per_s`` switches to Poisson arrivals. SSJF's aging guard is off by default (a threshold
longer than any run), as in the paper; a finite burst cannot starve.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from bench.experiments import harness
from bench.replay import replay
from bench.request_stats import summarize
from bench.workload import DEFAULT_LABELS, poisson_arrivals, with_arrivals
from pipeline.config import SchedulerConfig

TITLE = "SSJF vs FCFS: job completion time"
MODES = ("none", "dynamic", "continuous")


@dataclass(frozen=True)
class Params(harness.EngineWorkload):
    num_requests: int = 40
    max_prompt_tokens: int = 512
    max_output_tokens: int = 1024
    """Caps fewer than 1% of ShareGPT responses (under the tiny model's tokenizer): the long tail stays."""
    batch_size: int = 8
    """max_num_seqs of the dynamic and continuous modes (the none mode is 1)."""
    chunk_size: int = 256
    rate_per_s: float | None = None
    """Poisson arrivals at this rate; None for a burst at t=0."""
    aging_threshold_s: float = 1e6


SIZES = {
    "full": Params(),
    "smoke": Params(num_requests=10, max_prompt_tokens=128, max_output_tokens=96, batch_size=4),
    # A real model (--model .models/smollm2-135m-instruct) with its own lengths: about 30 minutes here.
    "real": Params(
        labels=str(DEFAULT_LABELS), num_requests=16, max_prompt_tokens=1024, max_output_tokens=512
    ),
}


def schedulers(params: Params) -> dict[str, SchedulerConfig]:
    common = {"chunk_size": params.chunk_size, "aging_threshold_s": params.aging_threshold_s}
    return {
        "none": SchedulerConfig(policy="prefill_first", max_num_seqs=1, **common),
        "dynamic": SchedulerConfig(policy="dynamic", max_num_seqs=params.batch_size, **common),
        "continuous": SchedulerConfig(policy="sarathi", max_num_seqs=params.batch_size, **common),
    }


def run(params: Params, predictor: harness.PredictorChoice) -> dict[str, Any]:
    engines = harness.Engines(params.model_dir)
    workload = harness.sharegpt_workload(engines.tokenizer, params)
    if params.rate_per_s is not None:
        workload = with_arrivals(workload, poisson_arrivals(len(workload), params.rate_per_s, params.seed))
    estimates = harness.length_estimates(workload, predictor)
    true_tokens = [r.output_tokens for r in workload]
    rows = []
    for mode, scheduler in schedulers(params).items():
        orders = [("fcfs", None)] + [("ssjf " + e.source, e) for e in estimates]
        for label, estimate in orders:
            config = replace(scheduler, queue_order="fcfs" if estimate is None else "ssjf")
            predicted = list(estimate.output_tokens) if estimate else None
            measured = replay(
                engines.engine(config), workload, predicted=predicted, desc=f"ssjf {mode} {label}"
            )
            s = summarize(measured.metrics)
            rows.append(
                {
                    "mode": mode,
                    "order": label,
                    "mean_jct_s": s.mean_jct_s,
                    "p99_jct_s": s.p99_jct_s,
                    "mean_ttft_s": s.mean_ttft_s,
                    "output_tokens_per_s": s.output_tokens_per_s,
                }
            )
    _add_reductions(rows)
    return {
        "experiment": "ssjf",
        "title": TITLE,
        "params": asdict(params),
        "predictor": predictor.note,
        "prediction_quality": {
            e.source: harness.prediction_quality(true_tokens, e.output_tokens)
            for e in estimates
            if e.source != "oracle"
        },
        "workload": {
            "num_requests": len(workload),
            "mean_output_tokens": sum(true_tokens) / len(true_tokens),
            "arrivals": "burst at t=0" if params.rate_per_s is None else f"Poisson {params.rate_per_s}/s",
        },
        "rows": rows,
        "targets": targets(rows),
    }


def _add_reductions(rows: list[dict[str, Any]]) -> None:
    """Each row's change in mean and p99 JCT against FCFS in the same mode (negative is better)."""
    fcfs = {r["mode"]: r for r in rows if r["order"] == "fcfs"}
    for r in rows:
        base = fcfs[r["mode"]]
        r["mean_jct_change"] = r["mean_jct_s"] / base["mean_jct_s"] - 1
        r["p99_jct_change"] = r["p99_jct_s"] / base["p99_jct_s"] - 1


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for mode in MODES:
        cut = [-r["mean_jct_change"] for r in rows if r["mode"] == mode and r["order"] == "ssjf predicted"]
        found.append(
            harness.target(
                f"SSJF (predictor) cuts mean JCT >= 35% vs FCFS, {mode} batching",
                cut[0] if cut else None,
                0.35,
            )
        )
    return found


def oracle_shares(result: dict[str, Any]) -> list[float | None]:
    """Per target (one per mode): the share of the oracle's mean-JCT cut that the predictor keeps."""
    cut = {(r["mode"], r["order"]): -r["mean_jct_change"] for r in result["rows"]}
    return [
        harness.share_of_gain(cut.get((mode, "ssjf predicted")), cut.get((mode, "ssjf oracle")))
        for mode in MODES
    ]


def render(result: dict[str, Any]) -> str:
    p, w = result["params"], result["workload"]
    header = [
        "mode",
        "order",
        "mean JCT (s)",
        "vs FCFS",
        "p99 JCT (s)",
        "vs FCFS",
        "mean TTFT (s)",
        "tokens/s",
    ]
    table = harness.markdown_table(
        header,
        [
            [
                r["mode"],
                r["order"],
                r["mean_jct_s"],
                f"{r['mean_jct_change']:+.1%}",
                r["p99_jct_s"],
                f"{r['p99_jct_change']:+.1%}",
                r["mean_ttft_s"],
                r["output_tokens_per_s"],
            ]
            for r in result["rows"]
        ],
    )
    quality = "; ".join(
        f"{name}: mean absolute error {q['mae_tokens']:.0f} tokens, Spearman rank correlation {q['spearman']:.2f}"
        for name, q in result["prediction_quality"].items()
    )
    return "\n\n".join(
        [
            f"{harness.workload_text(p, w['num_requests'])}, mean output {w['mean_output_tokens']:.0f} tokens; arrivals: "
            f"{w['arrivals']}. "
            f"Modes: none = batch 1 (`prefill_first`, max_num_seqs 1); dynamic = `dynamic` batches of "
            f"{p['batch_size']}; continuous = `sarathi`, max_num_seqs {p['batch_size']}, chunk {p['chunk_size']}. "
            f"SSJF aging threshold {p['aging_threshold_s']:g} s. Lengths: {result['predictor']}; predictions are "
            f"made before the replay, so the predictor's own latency is not in these completion times."
            + (f" Predictor quality on these requests: {quality}." if quality else ""),
            table,
            _summary(result["rows"]),
            harness.provenance(result),
        ]
    )


def _summary(rows: list[dict[str, Any]]) -> str:
    """Mean-JCT change per mode for each length source: the oracle bounds what a predictor can reach."""
    parts = []
    for mode in MODES:
        changes = [
            f"{r['order']} {r['mean_jct_change']:+.1%}"
            for r in rows
            if r["mode"] == mode and r["order"] != "fcfs"
        ]
        parts.append(f"{mode}: {', '.join(changes)}")
    return "Mean JCT vs FCFS (the paper: -30.5% to -39.6%) — " + "; ".join(parts) + "."


def plot(result: dict[str, Any], path: str) -> None:
    fig, (ax,) = harness.new_figure(width_in=7.0)
    orders = list(dict.fromkeys(r["order"] for r in result["rows"]))
    width = 0.8 / len(orders)
    for i, order in enumerate(orders):
        rows = {r["mode"]: r for r in result["rows"] if r["order"] == order}
        xs = [m + (i - (len(orders) - 1) / 2) * width for m in range(len(MODES))]
        ax.bar(xs, [rows[m]["mean_jct_s"] for m in MODES], width, label=f"{order} (mean)")
        ax.scatter(xs, [rows[m]["p99_jct_s"] for m in MODES], marker="_", s=200, color="black")
    ax.set_xticks(range(len(MODES)), [f"{m} batching" for m in MODES])
    ax.set_ylabel("job completion time (s); bars mean, dashes p99")
    ax.set_title("SSJF vs FCFS on the real engine")
    ax.legend()
    harness.save_figure(fig, path)
