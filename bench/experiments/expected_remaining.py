"""Ordering by expected remaining work (the predicted length distribution) vs the point prediction, simulated.

    python -m bench.experiments.expected_remaining --profile profiles/cpu-smollm2-135m-instruct.json \
        --num-replicas 4 --rates 1.6,1.9 --json docs/results/smollm2-135m-instruct/expected_remaining.json

SmolLM2-135M-Instruct's own answer lengths on the default predictor's clean held-out prompts (the rows of
``tools/predictor/uncertainty.py``'s JSON), drawn with replacement, Poisson arrivals, SARATHI replicas
behind the deployed ``least_predicted_work`` router. Every row serves the same requests; only the queue
order in each replica differs: FCFS, SSJF on the point prediction (fixed 30 s aging, and ``ssjf_bounded``
with the wait bound), ``expected_remaining`` (the mean remaining work under the distribution, same wait
bound), and ``ssjf_bounded`` on the true lengths for the ceiling. Each request's distribution is the
table fitted on the other grouped folds (out of fold: it never saw its own prompt). Several seeds (the
draw of requests and arrivals) show whether a difference is more than noise.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.experiments import harness
from bench.request_stats import summarize
from bench.sim.cost_model import StepCostModel
from bench.sim.simulator import ClusterSimulator, SimConfig, SimRequest
from bench.workload import poisson_arrivals
from cluster.predictor.distribution import DistributionTable

TITLE = "Ordering by the predicted length distribution vs the point prediction (simulated)"
CALIBRATION = harness.REPO_DIR / "docs" / "results" / "smollm2-135m-instruct" / "length_distribution.json"
ORDERS = (
    ("fcfs", "point"),
    ("ssjf", "point"),
    ("ssjf_bounded", "point"),
    ("expected_remaining", "distribution"),
    ("ssjf_bounded", "oracle"),
)
"""(queue order, what it ranks by): the rows of every (rate, seed)."""
BASELINE = ("ssjf_bounded", "point")
"""The point-estimate order with the same wait bound as ``expected_remaining``: the comparison that matters."""


@dataclass(frozen=True)
class Params:
    calibration: str = str(CALIBRATION)
    """``tools/predictor/uncertainty.py``'s JSON: the clean held-out prompts, their folds, the calibration."""
    profile: str = str(harness.REPO_DIR / "profiles" / "cpu-smollm2-135m-instruct.json")
    num_replicas: int = 4
    num_requests: int = 1000
    rates: tuple[float, ...] = (1.6, 1.9)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    max_num_seqs: int = 32
    chunk_size: int = 512
    service_s_per_token: float = 0.06
    """``SchedulerConfig.service_s_per_token`` (the wait bound of ``ssjf_bounded`` and ``expected_remaining``)."""
    max_wait_floor_s: float = 10.0
    max_wait_service_multiple: float = 4.0
    num_blocks: int = 100_000
    """KV blocks of 16 tokens per replica: the default never runs out; a few hundred make running requests
    preempt each other, so preempted ones wait with tokens generated (where E[L - g | L > g] differs most)."""


def requests_for(
    params: Params, calibration: dict, rate_per_s: float, seed: int
) -> dict[str, list[SimRequest]]:
    """The same draw of prompts and arrivals for each kind of ranking: point, distribution, oracle."""
    rows = calibration["rows"]
    cap = calibration["max_output_tokens"]
    tables = {
        fold: DistributionTable.fit(
            [r["predicted_tokens"] for r in rows if r["fold"] != fold],
            [r["output_tokens"] for r in rows if r["fold"] != fold],
            cap,
            calibration["calibration"]["num_bands"],
        )
        for fold in range(calibration["num_folds"])
    }
    rng = random.Random(seed)
    drawn = [rng.choice(rows) for _ in range(params.num_requests)]
    arrivals = poisson_arrivals(len(drawn), rate_per_s, seed)
    by_kind: dict[str, list[SimRequest]] = {"point": [], "distribution": [], "oracle": []}
    for r, arrival_s in zip(drawn, arrivals, strict=True):
        prompt, true, guess = r["prompt_tokens"], r["output_tokens"], r["predicted_tokens"]
        spread = tables[r["fold"]].for_prediction(guess)
        by_kind["point"].append(SimRequest(arrival_s, prompt, true, guess))
        by_kind["distribution"].append(
            SimRequest(arrival_s, prompt, true, guess, output_length_distribution=spread)
        )
        by_kind["oracle"].append(SimRequest(arrival_s, prompt, true, None))
    return by_kind


def simulate(params: Params, cost_model: StepCostModel, order: str, requests: list[SimRequest]) -> dict:
    scheduler = harness.simulated_sarathi(params, order)
    config = SimConfig(
        scheduler=scheduler,
        num_replicas=params.num_replicas,
        num_blocks=params.num_blocks,
        replica_routing="least_predicted_work",
    )
    metrics = ClusterSimulator(config, cost_model).run(requests)
    s = summarize(metrics)
    return {
        "mean_jct_s": s.mean_jct_s,
        "p99_jct_s": s.p99_jct_s,
        "p99_ttft_s": s.p99_ttft_s,
        "num_preemptions": sum(m.num_preemptions for m in metrics),
    }


def run(params: Params) -> dict:
    calibration = json.loads(Path(params.calibration).read_text())
    cost_model = StepCostModel.load(params.profile)
    rows = []
    for rate in params.rates:
        for seed in params.seeds:
            by_kind = requests_for(params, calibration, rate, seed)
            started = time.time()
            for order, kind in ORDERS:
                rows.append(
                    {
                        "rate_per_s": rate,
                        "seed": seed,
                        "order": order,
                        "ranks_by": kind,
                        **simulate(params, cost_model, order, by_kind[kind]),
                    }
                )
            print(f"rate {rate:g}, seed {seed}: {time.time() - started:.0f} s", flush=True)
    return {
        "experiment": "expected_remaining",
        "params": asdict(params),
        "profile_source": cost_model.source,
        "calibration": calibration["calibration"],
        "calibration_meta": calibration["meta"],
        "rows": rows,
        "comparisons": comparisons(rows, params.rates),
    }


def comparisons(rows: list[dict], rates: tuple[float, ...]) -> list[dict]:
    """Per rate and row kind: the change in mean and p99 JCT against FCFS and against ``BASELINE``, paired
    by seed (the same requests), as the mean, smallest and largest over the seeds, and the seeds it won."""
    found = []
    for rate in rates:
        at = [r for r in rows if r["rate_per_s"] == rate]
        runs = {(r["order"], r["ranks_by"], r["seed"]): r for r in at}
        seeds = sorted({r["seed"] for r in at})
        for order, kind in ORDERS[1:]:
            entry = {"rate_per_s": rate, "order": order, "ranks_by": kind}
            for base_name, base in (("fcfs", ("fcfs", "point")), ("point_ssjf_bounded", BASELINE)):
                if (order, kind) == base:
                    continue
                for metric in ("mean_jct_s", "p99_jct_s"):
                    changes = [runs[(order, kind, s)][metric] / runs[(*base, s)][metric] - 1 for s in seeds]
                    entry[f"{metric}_vs_{base_name}"] = {
                        "mean": statistics.fmean(changes),
                        "min": min(changes),
                        "max": max(changes),
                        "num_seeds_better": sum(c < 0 for c in changes),
                    }
            found.append(entry)
    return found


TARGET_CUT = 0.01
"""A cut smaller than 1% of mean JCT is within what the seeds move it (see the table's ranges): not a win."""


def targets(result: dict) -> list[dict]:
    """Per rate: does ordering by the distribution cut mean JCT by at least ``TARGET_CUT`` against the point
    estimate with the same bound, on average over the seeds?"""
    return [
        harness.target(
            f"expected_remaining cuts mean JCT >= {TARGET_CUT:.0%} vs point-estimate ssjf_bounded, "
            f"{c['rate_per_s']:g} req/s ({Path(result['params']['profile']).stem}, "
            f"{result['params']['num_replicas']} replicas)",
            -c["mean_jct_s_vs_point_ssjf_bounded"]["mean"],
            TARGET_CUT,
        )
        for c in result["comparisons"]
        if c["order"] == "expected_remaining"
    ]


def oracle_shares(result: dict) -> list[float | None]:
    """Per target: the share of the exact lengths' mean-JCT cut (over the point estimate, same bound) that
    ordering by the distribution keeps."""
    by_rate: dict[float, dict[str, float]] = {}
    for c in result["comparisons"]:
        if "mean_jct_s_vs_point_ssjf_bounded" in c:
            by_rate.setdefault(c["rate_per_s"], {})[c["ranks_by"]] = -c["mean_jct_s_vs_point_ssjf_bounded"][
                "mean"
            ]
    return [
        harness.share_of_gain(by_rate[rate].get("distribution"), by_rate[rate].get("oracle"))
        for rate in sorted(by_rate)
        if "distribution" in by_rate[rate]
    ]


def _change(figures: dict | None) -> str:
    if figures is None:
        return "–"
    return (
        f"{figures['mean']:+.1%} ({figures['min']:+.1%} to {figures['max']:+.1%}), "
        f"better in {figures['num_seeds_better']}"
    )


def render(result: dict) -> str:
    p, c = result["params"], result["calibration"]
    calibration_table = harness.markdown_table(
        ["predicted quantile", "share of answers below", "at or below"],
        [
            [f"p{round(x['level'] * 100)}", f"{x['share_below']:.2f}", f"{x['share_at_or_below']:.2f}"]
            for x in c["levels"]
        ]
        + [
            [
                "the point prediction",
                f"{c['point_prediction']['share_below']:.2f}",
                f"{c['point_prediction']['share_at_or_below']:.2f}",
            ]
        ],
    )
    mean_of = {}
    for r in result["rows"]:
        mean_of.setdefault((r["rate_per_s"], r["order"], r["ranks_by"]), []).append(r)
    table = []
    for rate in p["rates"]:
        for order, kind in ORDERS:
            runs = mean_of[(rate, order, kind)]
            comparison = next(
                (
                    x
                    for x in result["comparisons"]
                    if (x["rate_per_s"], x["order"], x["ranks_by"]) == (rate, order, kind)
                ),
                {},
            )
            table.append(
                [
                    f"{rate:g}",
                    order,
                    kind,
                    f"{statistics.fmean(r['mean_jct_s'] for r in runs):.1f}",
                    f"{statistics.fmean(r['p99_jct_s'] for r in runs):.1f}",
                    _change(comparison.get("mean_jct_s_vs_fcfs")),
                    _change(comparison.get("mean_jct_s_vs_point_ssjf_bounded")),
                    _change(comparison.get("p99_jct_s_vs_point_ssjf_bounded")),
                ]
            )
    headers = [
        "req/s",
        "order",
        "ranks by",
        "mean JCT (s)",
        "p99 JCT (s)",
        "mean JCT vs FCFS",
        "mean JCT vs point ssjf_bounded",
        "p99 JCT vs point ssjf_bounded",
    ]
    text = (
        f"Calibration of the predicted distribution (`cluster/predictor/default/length_distribution.json`): "
        f"{c['num_prompts']} clean held-out SmolLM2 prompts, {c['num_bands']} bands of predicted length, quantiles "
        f"of each prompt from the table fitted on the other grouped folds (`{result['calibration_meta']['command']}`). "
        f"{c['share_at_cap']:.0%} of answers stop at the 512-token cap, so a quantile at the cap has an atom under "
        f"it: a level is calibrated when it lies between the two shares."
    )
    ordering = (
        f"Ordering: {p['num_requests']} requests drawn with replacement from those prompts (SmolLM2's own lengths), "
        f"Poisson arrivals, {p['num_replicas']} replicas under `{Path(p['profile']).name}` "
        f"({result['profile_source']}), SARATHI (chunk {p['chunk_size']}, {p['max_num_seqs']} sequences), "
        f"least-predicted-work routing, {p.get('num_blocks', 100_000)} KV blocks of 16 tokens per replica; wait bound max({p['max_wait_floor_s']:g} s, "
        f"{p['max_wait_service_multiple']:g} x predicted work x {p['service_s_per_token']:g} s). Figures are means "
        f"over {len(p['seeds'])} seeds; changes are paired by seed: mean (smallest to largest), and the number of "
        f"seeds where the row was better. Where it stands: docs/ROUTING.md."
    )
    parts = [text, calibration_table, ordering, harness.markdown_table(headers, table)]
    if p.get("num_blocks", Params.num_blocks) < Params.num_blocks:
        preemptions = statistics.fmean(r["num_preemptions"] for r in result["rows"])
        lead = (
            f"**KV short ({p['num_blocks']} blocks per replica): preempted requests wait with tokens generated**, "
            f"{preemptions:.0f} recompute preemptions per run of {p['num_requests']} requests on average."
        )
        parts.insert(0, lead)
    if "meta" in result:
        parts.append(harness.provenance(result))
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", default=Params.calibration)
    harness.add_simulation_flags(parser, Params)
    parser.add_argument("--service-s-per-token", type=float, default=Params.service_s_per_token)
    parser.add_argument("--num-blocks", type=int, default=Params.num_blocks, help="KV blocks per replica")
    parser.add_argument(
        "--json", required=True, help="docs/results/MODEL/expected_remaining.json for the report"
    )
    args = parser.parse_args()
    start_s, load_at_start = time.perf_counter(), harness.load_average()
    params = Params(
        calibration=args.calibration,
        **harness.simulation_options(args),
        service_s_per_token=args.service_s_per_token,
        num_blocks=args.num_blocks,
    )
    harness.finish_module_run(sys.modules[__name__], run(params), start_s, load_at_start, args.json)


if __name__ == "__main__":
    main()
