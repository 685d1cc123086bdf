"""Length-aware vs length-blind serving of 16 replicas in the simulator: capacity under an SLO.

    python -m bench.experiments.replica_routing --profile profiles/gpu-llama3-8b-h100-estimate.json \
        --json docs/results/llama3-8b-h100-estimate/replica_routing.json

Length-blind is what plain Ray Serve gives: Serve's power-of-two choice on queue length, FCFS inside each
replica. Length-aware is binserve's default: the replica with the least predicted work
(``cluster.router.PredictedWorkBook``, reports every 0.5 s as deployed) and SSJF inside each replica; the
two mixed rows say which half the gain comes from. Every row serves the same requests (ShareGPT prompts
and answer lengths under the tiny model's tokenizer, Poisson arrivals) under SARATHI on one pool.

Predictions: the oracle (the true length), synthetic ones of a given Spearman rank correlation (the true
length times log-normal noise, its width found by bisection), and the trained ChatGPT-length predictor.
Capacity is the highest rate of a grid up to which every run meets the SLO; one grid serves both SLOs.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.experiments import harness
from bench.request_stats import MetricsSummary, Slo, summarize
from bench.sim.cost_model import StepCostModel
from bench.sim.simulator import ClusterSimulator, SimConfig, SimRequest
from bench.workload import WorkloadRequest, poisson_arrivals
from pipeline.config import SchedulerConfig
from workers.checkpoint import load_tokenizer


def slos_of(mean_jct_s: float, p99_ttft_s: float, scale: float = 1.0) -> dict[str, Slo]:
    """The two SLOs capacity is measured under, by name: mean JCT (what shortest-predicted-first serves) and
    p99 TTFT (the tail it must not give up), each with a p99 TBT bound that keeps the decode smooth."""
    tbt = 0.1 * scale
    return {
        f"mean JCT <= {mean_jct_s * scale:g} s": Slo(mean_jct_s=mean_jct_s * scale, p99_tbt_s=tbt),
        f"p99 TTFT <= {p99_ttft_s * scale:g} s": Slo(p99_ttft_s=p99_ttft_s * scale, p99_tbt_s=tbt),
    }


@dataclass(frozen=True)
class Params(harness.SimulatedWorkload):
    chunk_size: int = 512
    num_blocks: int = 25_000
    slo_scale_s: float = 1.0
    """SLO bounds scale with the profile's step time: 1 for the GPU profile."""
    mean_jct_s: float = 4.0
    """About twice the unloaded mean JCT on the GPU profile (2.1 s)."""
    p99_ttft_s: float = 2.0
    rates: tuple[float, ...] = (150.0, 200.0, 250.0, 300.0, 350.0, 400.0, 450.0)
    """The rate grid: capacity is the highest rate up to which the SLO holds at every grid rate."""
    report_rate_per_s: float = 300.0
    spearmans: tuple[float, ...] = (0.54, 0.35)
    service_s_per_token: float = 0.02
    """``SchedulerConfig.service_s_per_token`` for ``hrrn`` and ``ssjf_bounded``: a SARATHI step of this
    profile at 32 decodes plus a 512-token chunk takes about 20 ms."""
    max_wait_floor_s: float = 10.0
    """``SchedulerConfig.max_wait_floor_s``: the wait bound of ``hrrn`` and ``ssjf_bounded``."""
    max_wait_service_multiple: float = 4.0
    """``SchedulerConfig.max_wait_service_multiple``."""
    use_trained_predictor: bool = False
    systems: tuple[tuple[str, str, str], ...] = field(
        default=(
            ("length-blind (Serve power-of-two, FCFS)", "power_of_two", "fcfs"),
            ("power-of-two, SSJF", "power_of_two", "ssjf"),
            ("least predicted work, FCFS", "least_predicted_work", "fcfs"),
            ("length-aware (least predicted work, SSJF)", "least_predicted_work", "ssjf"),
        )
    )


def noisy_lengths(true_tokens: Sequence[int], target_spearman: float, seed: int) -> list[int]:
    """Predictions whose Spearman correlation with ``true_tokens`` is about ``target_spearman``: each true
    length times ``exp(sigma * z)``, ``z`` standard normal, ``sigma`` found by bisection."""
    rng = random.Random(seed)
    z = [rng.gauss(0.0, 1.0) for _ in true_tokens]

    def predict(sigma: float) -> list[int]:
        return [max(1, round(t * math.exp(sigma * zi))) for t, zi in zip(true_tokens, z, strict=True)]

    low, high = 0.0, 20.0
    for _ in range(30):
        mid = (low + high) / 2
        if harness.spearman(true_tokens, predict(mid)) > target_spearman:
            low = mid
        else:
            high = mid
    return predict(low)


def simulate(
    params: Params,
    cost_model: StepCostModel,
    routing: str,
    queue_order: str,
    workload: Sequence[WorkloadRequest],
    predicted: Sequence[int],
    rate_per_s: float,
) -> MetricsSummary:
    scheduler = harness.simulated_sarathi(params, queue_order)
    config = SimConfig(
        scheduler=scheduler,
        num_replicas=params.num_replicas,
        num_blocks=params.num_blocks,
        replica_routing=routing,
        seed=params.seed,
    )
    arrivals = poisson_arrivals(len(workload), rate_per_s, params.seed)
    requests = [
        SimRequest(arrival_s, len(r.prompt_token_ids), r.output_tokens, p)
        for r, arrival_s, p in zip(workload, arrivals, predicted, strict=True)
    ]
    return summarize(ClusterSimulator(config, cost_model).run(requests))


def capacity(rates: Sequence[float], summaries: Sequence[MetricsSummary], slo) -> float:
    """The highest rate of the grid up to which every rate meets ``slo`` (0 if the lowest misses it)."""
    best = 0.0
    for rate, summary in zip(rates, summaries, strict=True):
        if not slo.is_met(summary):
            break
        best = rate
    return best


def run(params: Params) -> dict:
    cost_model = StepCostModel.load(params.profile)
    workload = harness.sharegpt_workload(load_tokenizer(params.tokenizer_dir), params)
    true_tokens = [r.output_tokens for r in workload]
    predictions = {"oracle": true_tokens}
    for rho in params.spearmans:
        predictions[f"synthetic, Spearman {rho}"] = noisy_lengths(true_tokens, rho, params.seed)
    if params.use_trained_predictor:
        choice = harness.load_predictor()
        if choice.predictor is not None:
            out = choice.predictor.predict([r.prompt for r in workload]).output_tokens
            predictions["trained ChatGPT predictor"] = [int(n) for n in out]
    slos = slos_of(params.mean_jct_s, params.p99_ttft_s, params.slo_scale_s)
    rows = []
    for source, predicted in predictions.items():
        quality = harness.spearman(true_tokens, predicted)
        for name, routing, order in params.systems:
            if source != "oracle" and order == "fcfs":
                continue  # length-blind is the same whatever the predictions; the FCFS mixed row: oracle only
            started = time.time()
            summaries = [
                simulate(params, cost_model, routing, order, workload, predicted, rate)
                for rate in params.rates
            ]
            row = {
                "predictions": source,
                "spearman": quality,
                "system": name,
                "by_rate": [
                    {"rate_per_s": r, **s.as_dict()} for r, s in zip(params.rates, summaries, strict=True)
                ],
            }
            row.update({slo_name: capacity(params.rates, summaries, slo) for slo_name, slo in slos.items()})
            print(
                f"{source} | {name} | " + ", ".join(f"{k}: {row[k]:g}" for k in slos),
                f"({time.time() - started:.0f} s)",
            )
            rows.append(row)
    return {"params": asdict(params), "profile_source": cost_model.source, "slos": list(slos), "rows": rows}


TITLE = "Length-aware routing across 16 replicas (simulated): capacity under an SLO"
TARGET_RATIO = 1.3
TAIL_TARGET_RATIOS = (1.2, 1.0)
"""Issue 25: with one queue order, capacity >= 1.2x length-blind under the mean-JCT SLO AND >= 1.0x under
the p99-TTFT SLO."""

ORDER_NAMES = {
    "ssjf": "SSJF",
    "ssjf_bounded": "SSJF, size-tied aging",
    "hrrn": "HRRN",
    "expected_remaining": "least expected remaining work",
}


def length_aware_system(queue_order: str) -> tuple[str, str, str]:
    """The row of binserve's replica routing (least predicted work) with ``queue_order`` in each replica."""
    if queue_order == "fcfs":
        return ("least predicted work, FCFS", "least_predicted_work", "fcfs")
    return (
        f"length-aware (least predicted work, {ORDER_NAMES[queue_order]})",
        "least_predicted_work",
        queue_order,
    )


def targets(result: dict) -> list[dict]:
    """Per length-aware row: its capacity under the first (mean-JCT) SLO against length-blind serving's,
    at least ``TARGET_RATIO`` times; and, where both SLOs were run, the tail target (``TAIL_TARGET_RATIOS``),
    judged on the lesser of the two ratios each divided by its threshold."""
    slos = result["slos"]
    blind_row = next(r for r in result["rows"] if r["system"].startswith("length-blind"))
    found = []
    for row in result["rows"]:
        if not row["system"].startswith("length-aware"):
            continue
        ratios = [row[slo] / blind_row[slo] if blind_row[slo] else None for slo in slos]
        goal = f"capacity under {slos[0]} >= {TARGET_RATIO}x length-blind, {row['predictions']} lengths"
        found.append(harness.target(goal, ratios[0], TARGET_RATIO))
        if len(slos) < 2:
            continue
        jct_goal, ttft_goal = TAIL_TARGET_RATIOS
        both = None if None in ratios[:2] else min(ratios[0] / jct_goal, ratios[1] / ttft_goal)
        goal = (
            f"capacity >= {jct_goal}x length-blind under {slos[0]} and >= {ttft_goal}x under {slos[1]}, "
            f"{row['system']}, {row['predictions']} lengths (the lesser ratio over its goal)"
        )
        found.append(harness.target(goal, both, 1.0))
    return found


def oracle_shares(result: dict) -> list[float | None]:
    """Per stored target: the share of the oracle lengths' capacity gain over length-blind serving that its
    row's lengths keep, against the oracle row of the same system (under the mean-JCT SLO; for the tail
    target, under the p99-TTFT SLO)."""
    slos = result["slos"]
    blind_row = next(r for r in result["rows"] if r["system"].startswith("length-blind"))
    aware = [r for r in result["rows"] if r["system"].startswith("length-aware")]
    oracle_rows = {r["system"]: r for r in aware if r["predictions"] == "oracle"}

    def gain(row: dict | None, slo: str) -> float | None:
        return row[slo] / blind_row[slo] - 1 if row and blind_row[slo] else None

    shares = []
    for t in result["targets"]:
        tail = "lesser ratio" in t["target"]
        row = next(
            (
                r
                for r in aware
                if f"{r['predictions']} lengths" in t["target"] and (not tail or r["system"] in t["target"])
            ),
            None,
        )
        slo = slos[1 if tail else 0]
        oracle = oracle_rows.get(row["system"]) if row else None
        shares.append(harness.share_of_gain(gain(row, slo), gain(oracle, slo)))
    return shares


def merge_runs(first: dict, second: dict) -> dict:
    """One result from two runs of the same requests on different rate grids (a coarse grid, then a finer
    one around the capacities): every row's runs on the union of the grids, capacities recomputed. The
    simulator is deterministic, so a rate's run is the same whichever grid it came from."""
    run = first["params"]
    slos = slos_of(run["mean_jct_s"], run["p99_ttft_s"], run["slo_scale_s"])
    merged_rows = []
    for row in first["rows"]:
        twin = next(
            (
                r
                for r in second["rows"]
                if (r["predictions"], r["system"]) == (row["predictions"], row["system"])
            ),
            None,
        )
        by_rate = {x["rate_per_s"]: x for x in row["by_rate"] + (twin["by_rate"] if twin else [])}
        runs = [by_rate[rate] for rate in sorted(by_rate)]
        summaries = [MetricsSummary(**{k: v for k, v in x.items() if k != "rate_per_s"}) for x in runs]
        merged = {**row, "by_rate": runs}
        merged.update({name: capacity(sorted(by_rate), summaries, slo) for name, slo in slos.items()})
        merged_rows.append(merged)
    rates = sorted({*first["params"]["rates"], *second["params"]["rates"]})
    return {**first, "params": {**first["params"], "rates": rates}, "rows": merged_rows}


def render(result: dict) -> str:
    slos = result["slos"]
    blind = next(r for r in result["rows"] if r["system"].startswith("length-blind"))
    table = []
    for r in result["rows"]:
        cells = [r["predictions"], f"{r['spearman']:.2f}", r["system"]]
        for slo in slos:
            cells += [f"{r[slo]:g}", f"{r[slo] / blind[slo]:.2f}x" if blind[slo] else "–"]
        at = {x["rate_per_s"]: x for x in r["by_rate"]}
        probe = at[result["params"]["report_rate_per_s"]]
        cells += [f"{probe['mean_jct_s']:.2f}", f"{probe['p99_ttft_s']:.2f}"]
        table.append(cells)
    headers = ["predictions", "Spearman", "system"]
    for slo in slos:
        headers += [f"capacity, {slo} (req/s)", "vs blind"]
    rate = result["params"]["report_rate_per_s"]
    headers += [f"mean JCT at {rate:g} req/s (s)", f"p99 TTFT at {rate:g} req/s (s)"]
    p = result["params"]
    text = (
        f"{p['num_replicas']} replicas in one pool, simulated under the step-cost profile `{Path(p['profile']).name}` "
        f"({result['profile_source']}). {p['num_requests']} ShareGPT requests (prompts cut to {p['max_prompt_tokens']} "
        f"tokens, answers to {p['max_output_tokens']}), Poisson arrivals, SARATHI (chunk {p['chunk_size']}, "
        f"{p['max_num_seqs']} sequences). Length-blind: Serve's power-of-two choice, FCFS replicas; length-aware: "
        f"least predicted work, SSJF replicas; the mixed rows split the gain. Capacity: the highest rate of the grid "
        f"({', '.join(f'{r:g}' for r in p['rates'])} req/s) up to which every run meets the SLO (each SLO also bounds "
        f"p99 TBT). Where and why it pays: docs/ROUTING.md."
    )
    parts = [text, harness.markdown_table(headers, table)]
    if "meta" in result:
        parts.append(harness.provenance(result))
    return "\n\n".join(parts)


def systems_of(queue_orders: str) -> tuple[tuple[str, str, str], ...]:
    """``--queue-orders``: length-blind, then least predicted work with each order, checked here."""
    orders = [o.strip() for o in queue_orders.split(",") if o.strip()]
    for order in orders:
        SchedulerConfig(queue_order=order)  # ValueError naming queue_order and its choices
    return (Params.systems[0], *(length_aware_system(o) for o in orders))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=Params.profile)
    parser.add_argument("--num-requests", type=int, default=Params.num_requests)
    parser.add_argument("--slo-scale", type=float, default=1.0, help="multiplies the SLO bounds")
    parser.add_argument("--rates", default=",".join(f"{r:g}" for r in Params.rates), help="the rate grid")
    parser.add_argument("--report-rate", type=float, default=Params.report_rate_per_s)
    parser.add_argument("--trained-predictor", action="store_true", help="add the ChatGPT-length predictor")
    parser.add_argument("--tokenizer", default=Params.tokenizer_dir, help="model directory measuring lengths")
    parser.add_argument(
        "--spearmans",
        default=",".join(f"{r:g}" for r in Params.spearmans),
        help="synthetic predictions of these Spearman correlations (besides the oracle); empty for none",
    )
    parser.add_argument(
        "--queue-orders",
        help="instead of the default rows: length-blind, then least predicted work with each of these "
        "queue orders (comma-separated QueueOrder values, e.g. fcfs,ssjf,ssjf_bounded,hrrn)",
    )
    parser.add_argument("--service-s-per-token", type=float, default=Params.service_s_per_token)
    parser.add_argument("--max-wait-floor-s", type=float, default=Params.max_wait_floor_s)
    parser.add_argument("--max-wait-service-multiple", type=float, default=Params.max_wait_service_multiple)
    parser.add_argument(
        "--merge", nargs=2, metavar="JSON", help="instead of running: merge two runs' grids (merge_runs)"
    )
    parser.add_argument(
        "--json", required=True, help="docs/results/MODEL/replica_routing.json for the report"
    )
    args = parser.parse_args()
    start_s, load_at_start = time.perf_counter(), harness.load_average()
    if args.merge:
        first, second = (json.loads(Path(p).read_text()) for p in args.merge)
        result = merge_runs(first, second)
    else:
        params = Params(
            profile=args.profile,
            num_requests=args.num_requests,
            slo_scale_s=args.slo_scale,
            rates=tuple(float(r) for r in args.rates.split(",")),
            report_rate_per_s=args.report_rate,
            use_trained_predictor=args.trained_predictor,
            tokenizer_dir=args.tokenizer,
            spearmans=tuple(float(r) for r in args.spearmans.split(",") if r),
            service_s_per_token=args.service_s_per_token,
            max_wait_floor_s=args.max_wait_floor_s,
            max_wait_service_multiple=args.max_wait_service_multiple,
            **({"systems": systems_of(args.queue_orders)} if args.queue_orders else {}),
        )
        harness.finish_module_run(sys.modules[__name__], run(params), start_s, load_at_start, args.json)
        return
    result["targets"] = targets(result)
    harness.write_json(Path(args.json), result)
    print(render(result))


if __name__ == "__main__":
    main()
