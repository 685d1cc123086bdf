"""Run HERE after a GPU check: the routing simulations on the measured profile beside the estimate's.

    python -m bench.gpu.simulations --measured profiles/gpu-llama3-8b-h100.json \
        --json docs/results/gpu/simulations.json

Not part of the check itself (the GPU machine has no Ray and its data would not travel): it needs the
tree's workloads and the simulator, and takes about 5-10 minutes on two shared cores. Both profiles run
the same requests under the same code:

- replica routing (``bench.experiments.replica_routing``): 16 replicas, length-blind (Serve's
  power-of-two, FCFS) against length-aware (least predicted work, SSJF) with oracle lengths and with
  Spearman-0.54 predictions; the capacity under the mean-JCT SLO (and the p99 TTFT one) on the rate grid.
  Rates above a row's first failure cannot raise its capacity, so they are not run;
- Multi-Bin (``bench.experiments.multibin``): static batches of 8 drawn from 1, 2, 4 or 8 equal-mass
  bins of the oracle lengths, output throughput relative to one bin.

Fewer requests than ``docs/ROUTING.md``'s 4,000 (``--num-requests 4000`` reproduces its setting, about
40 minutes per profile): the estimate's column here is the one to compare with, not ROUTING.md's.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

from bench.experiments import multibin, replica_routing
from bench.experiments.harness import (
    DEFAULT_MODEL_DIR,
    REPO_DIR,
    ensure_tiny_model,
    load_average,
    markdown_table,
    oracle_lengths,
    run_meta,
    sharegpt_workload,
    write_json,
)
from bench.sim.cost_model import StepCostModel
from bench.sim.simulator import SimRequest
from workers.checkpoint import load_tokenizer

ESTIMATE = REPO_DIR / "profiles" / "gpu-llama3-8b-h100-estimate.json"
ROUTING_SYSTEMS = (
    ("length-blind", "power_of_two", "fcfs", ("oracle",)),
    ("length-aware", "least_predicted_work", "ssjf", ("oracle", "Spearman 0.54")),
)


def routing_capacities(params: replica_routing.Params, cost_model: StepCostModel, workload) -> list[dict]:  # noqa: ANN001
    true_tokens = [r.output_tokens for r in workload]
    predictions = {
        "oracle": true_tokens,
        "Spearman 0.54": replica_routing.noisy_lengths(true_tokens, 0.54, params.seed),
    }
    slos = {
        "mean JCT": replica_routing.JctSlo(params.mean_jct_s, 0.1),
        "p99 TTFT": replica_routing.TtftSlo(params.p99_ttft_s, 0.1),
    }
    rows = []
    for system, routing, order, sources in ROUTING_SYSTEMS:
        for source in sources:
            capacity = dict.fromkeys(slos, 0.0)
            failed: set[str] = set()
            by_rate = []
            for rate in params.rates:
                summary = replica_routing.simulate(
                    params, cost_model, routing, order, workload, predictions[source], rate
                )
                by_rate.append({"rate_per_s": rate, **summary.as_dict()})
                for name, slo in slos.items():
                    if name not in failed and slo.is_met(summary):
                        capacity[name] = rate
                    else:
                        failed.add(name)
                if len(failed) == len(slos):
                    break  # a higher rate cannot raise a capacity
            rows.append({"system": system, "predictions": source, "capacity": capacity, "by_rate": by_rate})
            print(
                f"  {system}, {source}: " + ", ".join(f"{k} {v:g} req/s" for k, v in capacity.items()),
                flush=True,
            )
    return rows


def multibin_gains(params: multibin.Params, cost_model: StepCostModel, workload) -> dict[str, float]:  # noqa: ANN001
    estimate = oracle_lengths(workload)
    requests = [
        SimRequest(0.0, len(r.prompt_token_ids), r.output_tokens, p)
        for r, p in zip(workload, estimate.output_tokens, strict=True)
    ]
    throughput = {
        k: multibin.simulated_throughput(params, cost_model, requests, estimate.bin_boundaries(k))
        for k in params.bin_counts
    }
    return {str(k): t / throughput[params.bin_counts[0]] for k, t in throughput.items()}


def compare(profiles: dict[str, str], num_requests: int, rates: Sequence[float]) -> dict:
    ensure_tiny_model(DEFAULT_MODEL_DIR)
    tokenizer = load_tokenizer(DEFAULT_MODEL_DIR)
    routing_params = replace(replica_routing.Params(), num_requests=num_requests, rates=tuple(rates))
    routing_workload = sharegpt_workload(tokenizer, routing_params)
    multibin_params = multibin.Params()
    multibin_workload = sharegpt_workload(tokenizer, multibin_params)
    result: dict = {
        "routing_params": asdict(routing_params),
        "multibin_params": asdict(multibin_params),
        "profiles": {},
    }
    for label, path in profiles.items():
        cost_model = StepCostModel.load(path)
        print(f"== {label}: {path}", flush=True)
        result["profiles"][label] = {
            "path": path,
            "source": cost_model.source,
            "coefficients": {k: v for k, v in asdict(cost_model).items() if k != "source"},
            "routing": routing_capacities(routing_params, cost_model, routing_workload),
            "multibin_gain_vs_one_bin": multibin_gains(multibin_params, cost_model, multibin_workload),
        }
    return result


def render(result: dict) -> str:
    labels = list(result["profiles"])
    runs = [result["profiles"][label] for label in labels]
    coefficient_rows = [
        [name] + [f"{run['coefficients'][name]:.4g}" for run in runs] for name in runs[0]["coefficients"]
    ]
    top = max(result["routing_params"]["rates"])
    routing_rows = []
    for i, row in enumerate(runs[0]["routing"]):
        cells = [row["system"], row["predictions"]]
        for run in runs:
            blind = run["routing"][0]["capacity"]
            mine = run["routing"][i]["capacity"]
            for slo in ("mean JCT", "p99 TTFT"):
                edge = "+" if mine[slo] == top else ""  # at the grid's top: at least this much
                ratio = f" ({mine[slo] / blind[slo]:.2f}x)" if blind[slo] else ""
                cells.append(f"{mine[slo]:g}{edge}{ratio}")
        routing_rows.append(cells)
    routing_headers = ["system", "predictions"] + [
        f"{label}: {slo}" for label in labels for slo in ("mean JCT cap.", "p99 TTFT cap.")
    ]
    bins = result["multibin_params"]["bin_counts"]
    multibin_rows = [
        [f"{k} bins"] + [f"{run['multibin_gain_vs_one_bin'][str(k)]:.2f}x" for run in runs] for k in bins
    ]
    p = result["routing_params"]
    return "\n\n".join(
        [
            "Step-cost coefficients (s):\n\n" + markdown_table(["coefficient", *labels], coefficient_rows),
            f"Replica routing, {p['num_replicas']} replicas, {p['num_requests']} requests, capacity (req/s) "
            f"on the grid {', '.join(f'{r:g}' for r in p['rates'])} (+: the grid's top held), vs length-blind:\n\n"
            + markdown_table(routing_headers, routing_rows),
            "Multi-Bin, static batches of 8, oracle bins, throughput vs 1 bin:\n\n"
            + markdown_table(["bins", *labels], multibin_rows),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measured", required=True, help="the profile the GPU check wrote")
    parser.add_argument(
        "--estimate", default=str(ESTIMATE.relative_to(REPO_DIR)), help="the profile to set beside it"
    )
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--rates", default=",".join(f"{r:g}" for r in replica_routing.Params.rates))
    parser.add_argument("--json", default=None, help="write the comparison here")
    args = parser.parse_args()
    start_s, load_at_start = time.perf_counter(), load_average()
    result = compare(
        {"estimate": args.estimate, "measured": args.measured},
        args.num_requests,
        [float(r) for r in args.rates.split(",")],
    )
    result["meta"] = run_meta(
        "python -m bench.gpu.simulations "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v),
        time.perf_counter() - start_s,
        load_at_start,
    )
    if args.json:
        write_json(Path(args.json), result)
    print(render(result))


if __name__ == "__main__":
    main()
