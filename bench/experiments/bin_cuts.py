"""Bins routed to pools, cut from the labels or from the predictions (``tools/predictor/bins.py``), simulated.

    python -m bench.experiments.bin_cuts --profile profiles/cpu-smollm2-135m-instruct.json --num-replicas 2 \
        --rates 0.1,0.2,0.3 --num-requests 300 --json docs/results/smollm2-135m-instruct/bin_cuts.json

``deploy/serve-local.yaml``'s shape: 2 bins, one pool each, the replicas split equally between them. SmolLM2's
own answer lengths (its 1,242 labels), drawn with replacement at Poisson arrivals, each request binned by the
shipped default predictor's prediction (int8, as served); SARATHI replicas with FCFS queues (the simulator's
scheduler defaults). The same requests run three ways: the 2 bins cut
where the predictor's training labels split in half (as before 2026-12-07), where its predictions of the
workload's prompts split in half (now), and one pool holding every replica (no bins: the length-blind
reference). Several seeds (the draw and the arrivals).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass

from bench.experiments import harness
from bench.request_stats import summarize
from bench.sim.cost_model import StepCostModel
from bench.sim.simulator import ClusterSimulator, SimConfig, SimRequest
from bench.workload import DEFAULT_LABELS
from cluster.predictor.lengths import equal_mass_boundaries
from cluster.router import BinRouter

TITLE = "Bins routed to pools: cut from the labels or from the predictions (simulated)"
CUTS = ("labels", "predictions", "one pool")


@dataclass(frozen=True)
class Params:
    profile: str = str(harness.REPO_DIR / "profiles" / "cpu-smollm2-135m-instruct.json")
    num_replicas: int = 2
    num_requests: int = 300
    rates: tuple[float, ...] = (0.1, 0.2, 0.3)
    seeds: tuple[int, ...] = (0, 1, 2)
    labels: str = str(DEFAULT_LABELS)
    tokenizer: str = ".models/smollm2-135m-instruct"
    max_prompt_tokens: int = 1024
    max_output_tokens: int = 512


def run(params: Params) -> dict:
    from bench.labels import count_tokens, read_records
    from cluster.config import PredictorConfig
    from cluster.predictor import LengthPredictor

    records = read_records(params.labels, params.tokenizer)
    predictor = LengthPredictor.load(encoder_precision=PredictorConfig.encoder_precision)  # as served
    predicted = predictor.predict([r.prompt for r in records]).output_tokens
    prompt_tokens = count_tokens([r.prompt for r in records], params.tokenizer)
    edges = {
        "labels": equal_mass_boundaries(predictor.metadata.length_quantiles, 2),
        "predictions": predictor.bin_boundaries(2),
        "one pool": [],
    }
    cost_model = StepCostModel.load(params.profile)
    runs = []
    for rate in params.rates:
        for seed in params.seeds:
            rng, arrival_s, requests = random.Random(seed), 0.0, []
            for _ in range(params.num_requests):
                arrival_s += rng.expovariate(rate)
                i = rng.randrange(len(records))
                requests.append(
                    SimRequest(
                        arrival_s,
                        min(params.max_prompt_tokens, prompt_tokens[i]),
                        min(params.max_output_tokens, records[i].output_tokens),
                        predicted[i],
                    )
                )
            row: dict = {"rate": rate, "seed": seed}
            for cut in CUTS:
                router = BinRouter.build(edges[cut], num_pools=len(edges[cut]) + 1)
                sim = ClusterSimulator(SimConfig(num_replicas=params.num_replicas), cost_model, router)
                metrics = sim.run(requests)
                stats = summarize(metrics)
                row[cut] = {
                    "mean_jct_s": stats.mean_jct_s,
                    "p99_jct_s": stats.p99_jct_s,
                    "p99_ttft_s": stats.p99_ttft_s,
                    "share_in_bin_0": sum(router.bin_of(r.predicted_output_tokens) == 0 for r in requests)
                    / len(requests),
                }
            runs.append(row)
            print(rate, seed, {c: round(row[c]["mean_jct_s"], 2) for c in CUTS}, flush=True)
    return {"experiment": "bin_cuts", "title": TITLE, "params": asdict(params), "edges": edges, "runs": runs}


def by_rate(result: dict) -> dict[float, list[dict]]:
    rates: dict[float, list[dict]] = {}
    for row in result["runs"]:
        rates.setdefault(row["rate"], []).append(row)
    return rates


def targets(result: dict) -> list[dict]:
    return []  # a measurement of a fix, with no target of its own


def render(result: dict) -> str:
    p, edges = result["params"], result["edges"]
    lines = [
        f"{p['num_replicas']} replicas ({p['profile'].rsplit('/', 1)[-1]}), {p['num_requests']} requests per run, "
        f"seeds {', '.join(str(s) for s in p['seeds'])}; 2 bins cut at {edges['labels']} (labels) or "
        f"{edges['predictions']} (predictions). Means over the seeds; the change is paired by seed (smallest to "
        "largest).",
        "",
        "| req/s | in bin 0, labels' cut / predictions' | mean JCT: labels' cut | predictions' cut | change "
        "| one pool | p99 JCT: labels' cut | predictions' cut | one pool |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rate, rows in sorted(by_rate(result).items()):

        def mean(cut: str, key: str, rows: list[dict] = rows) -> float:
            return statistics.fmean(r[cut][key] for r in rows)

        changes = [r["predictions"]["mean_jct_s"] / r["labels"]["mean_jct_s"] - 1 for r in rows]
        lines.append(
            f"| {rate:g} | {mean('labels', 'share_in_bin_0'):.0%} / {mean('predictions', 'share_in_bin_0'):.0%} "
            f"| {mean('labels', 'mean_jct_s'):.1f} s | {mean('predictions', 'mean_jct_s'):.1f} s "
            f"| {statistics.fmean(changes):+.0%} ({min(changes):+.0%} to {max(changes):+.0%}) "
            f"| {mean('one pool', 'mean_jct_s'):.1f} s | {mean('labels', 'p99_jct_s'):.0f} s "
            f"| {mean('predictions', 'p99_jct_s'):.0f} s | {mean('one pool', 'p99_jct_s'):.0f} s |"
        )
    if "meta" in result:
        lines += ["", harness.provenance(result)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_simulation_flags(parser, Params)
    parser.add_argument(
        "--tokenizer", default=Params.tokenizer, help="SmolLM2's directory (counts prompt tokens)"
    )
    parser.add_argument("--json", required=True, help="docs/results/MODEL/bin_cuts.json for the report")
    args = parser.parse_args()
    if args.num_replicas < 2 or args.num_replicas % 2:
        parser.error(
            f"--num-replicas: must be an even number >= 2 (one half per pool), got {args.num_replicas}"
        )
    start_s, load_at_start = time.perf_counter(), harness.load_average()
    params = Params(
        **harness.simulation_options(args),
        tokenizer=args.tokenizer,
    )
    harness.finish_module_run(sys.modules[__name__], run(params), start_s, load_at_start, args.json)


if __name__ == "__main__":
    main()
