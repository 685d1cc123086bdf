"""Run HERE after a GPU check: the routing simulations on the measured profile beside the estimate's.

    python -m bench.gpu.simulations --measured profiles/gpu-llama3-8b-h100.json \
        --json docs/results/gpu/simulations.json

Not part of the check itself (the GPU machine has no Ray and its data would not travel): it needs the
tree's workloads and the simulator, and takes about 20 minutes on two shared cores. Both profiles run
the same requests under the same code:

- replica routing (``bench.experiments.replica_routing``): 16 replicas, length-blind (Serve's
  power-of-two, FCFS) against length-aware (least predicted work, SSJF) with oracle lengths and with
  Spearman-0.54 predictions; the capacity under the mean-JCT SLO (and the p99 TTFT one) on the rate grid.
  Rates above a row's first failure cannot raise its capacity, so they are not run;
- Multi-Bin (``bench.experiments.multibin``): static batches of 8 drawn from 1, 2, 4 or 8 equal-mass
  bins of the oracle lengths, output throughput relative to one bin.

ROUTING.md's setting (4,000 requests, where queues form: with 1,000 every capacity sits at the grid's
top), three of its rows, and the rates above a row's first failure skipped: about 10 minutes per profile
here. The measured profile's rate grid is the estimate's scaled by how much faster its typical step is,
so its capacity falls inside its grid (``--same-rates`` to keep the estimate's); the SLOs do not move.
"""

from __future__ import annotations

import argparse
import sys
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
from bench.workload import WorkloadRequest
from workers.checkpoint import load_tokenizer

ESTIMATE = REPO_DIR / "profiles" / "gpu-llama3-8b-h100-estimate.json"
ROUTING_SYSTEMS = (
    ("length-blind", "power_of_two", "fcfs", ("oracle",)),
    ("length-aware", "least_predicted_work", "ssjf", ("oracle", "Spearman 0.54")),
)


def routing_capacities(
    params: replica_routing.Params, cost_model: StepCostModel, workload: Sequence[WorkloadRequest]
) -> list[dict]:
    true_tokens = [r.output_tokens for r in workload]
    predictions = {
        "oracle": true_tokens,
        "Spearman 0.54": replica_routing.noisy_lengths(true_tokens, 0.54, params.seed),
    }
    slos = dict(
        zip(
            ("mean JCT", "p99 TTFT"),
            replica_routing.slos_of(params.mean_jct_s, params.p99_ttft_s).values(),
            strict=True,
        )
    )
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


def multibin_gains(
    params: multibin.Params, cost_model: StepCostModel, workload: Sequence[WorkloadRequest]
) -> dict[str, float]:
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


# A SARATHI step of the routing experiment's shape (chunk 512, 32 sequences, contexts around 800 tokens):
# prefill tokens, decode tokens, KV tokens read, requests.
TYPICAL_STEP = (512, 31, 31 * 800 + 512, 32)


def typical_step_s(cost_model: StepCostModel) -> float:
    coefficients = (
        cost_model.prefill_token_s,
        cost_model.decode_token_s,
        cost_model.kv_token_s,
        cost_model.request_s,
    )
    return cost_model.base_s + sum(c * x for c, x in zip(coefficients, TYPICAL_STEP, strict=True))


def scaled_rates(
    rates: Sequence[float], cost_model: StepCostModel, reference: StepCostModel
) -> tuple[float, ...]:
    """The rate grid moved by how much faster (or slower) a typical step is than the reference's, to 10
    req/s, so a profile's capacity falls inside its grid; the SLOs stay as they are."""
    speed = typical_step_s(reference) / typical_step_s(cost_model)
    return tuple(float(max(10, round(r * speed / 10) * 10)) for r in rates)


def compare(profiles: dict[str, str], num_requests: int, rates: Sequence[float], scale_rates: bool) -> dict:
    """``profiles``: label -> path, the first the reference whose grid is ``rates``."""
    ensure_tiny_model(DEFAULT_MODEL_DIR)
    tokenizer = load_tokenizer(DEFAULT_MODEL_DIR)
    base_params = replace(replica_routing.Params(), num_requests=num_requests, rates=tuple(rates))
    routing_workload = sharegpt_workload(tokenizer, base_params)
    multibin_params = multibin.Params()
    multibin_workload = sharegpt_workload(tokenizer, multibin_params)
    result: dict = {"multibin_params": asdict(multibin_params), "profiles": {}}
    reference = StepCostModel.load(next(iter(profiles.values())))
    for label, path in profiles.items():
        cost_model = StepCostModel.load(path)
        grid = scaled_rates(rates, cost_model, reference) if scale_rates else tuple(rates)
        params = replace(base_params, rates=grid)
        print(
            f"== {label}: {path}; typical step {typical_step_s(cost_model) * 1e3:.1f} ms; rates {grid}",
            flush=True,
        )
        result["profiles"][label] = {
            "path": path,
            "source": cost_model.source,
            "coefficients": {k: v for k, v in asdict(cost_model).items() if k != "source"},
            "typical_step_s": typical_step_s(cost_model),
            "routing_params": asdict(params),
            "routing": routing_capacities(params, cost_model, routing_workload),
            "multibin_gain_vs_one_bin": multibin_gains(multibin_params, cost_model, multibin_workload),
        }
    return result


def render(result: dict) -> str:
    labels = list(result["profiles"])
    runs = [result["profiles"][label] for label in labels]
    coefficient_rows = [
        [name] + [f"{run['coefficients'][name]:.4g}" for run in runs] for name in runs[0]["coefficients"]
    ]
    routing_rows = []
    for i, row in enumerate(runs[0]["routing"]):
        cells = [row["system"], row["predictions"]]
        for run in runs:
            top = max(run["routing_params"]["rates"])
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
    p = runs[0]["routing_params"]
    grids = "; ".join(
        f"{label} {', '.join(f'{r:g}' for r in run['routing_params']['rates'])}"
        for label, run in zip(labels, runs, strict=True)
    )
    coefficient_rows.append(["typical step (s)"] + [f"{run['typical_step_s']:.4g}" for run in runs])
    return "\n\n".join(
        [
            "Step-cost coefficients (s):\n\n" + markdown_table(["coefficient", *labels], coefficient_rows),
            f"Replica routing, {p['num_replicas']} replicas, {p['num_requests']} requests, SLOs mean JCT <= "
            f"{p['mean_jct_s']:g} s / p99 TTFT <= {p['p99_ttft_s']:g} s (each with p99 TBT <= 0.1 s); capacity "
            f"(req/s) on the grid ({grids}; +: the grid's top held), and vs length-blind:\n\n"
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
    parser.add_argument("--num-requests", type=int, default=replica_routing.Params.num_requests)
    parser.add_argument("--rates", default=",".join(f"{r:g}" for r in replica_routing.Params.rates))
    parser.add_argument(
        "--same-rates",
        action="store_true",
        help="the measured profile on the estimate's grid (default: scaled)",
    )
    parser.add_argument("--json", default=None, help="write the comparison here")
    args = parser.parse_args()
    start_s, load_at_start = time.perf_counter(), load_average()
    result = compare(
        {"estimate": args.estimate, "measured": args.measured},
        args.num_requests,
        [float(r) for r in args.rates.split(",")],
        scale_rates=not args.same_rates,
    )
    result["meta"] = run_meta(
        "python -m bench.gpu.simulations " + " ".join(sys.argv[1:]),
        time.perf_counter() - start_s,
        load_at_start,
    )
    if args.json:
        write_json(Path(args.json), result)
    print(render(result))


if __name__ == "__main__":
    main()
