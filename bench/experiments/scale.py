"""Experiment 6, at scale in the simulator: capacity of a 16-replica cluster, bins-to-pools routing vs
plain load balancing, on a GPU-shaped step-cost profile.

    binserve bench exp scale             # writes docs/results/MODEL/scale.json and .png

Capacity is the highest Poisson rate whose run meets a p99 TTFT / p99 TBT SLO (``find_capacity``,
bisection). The profile ``profiles/gpu-llama3-8b-h100-estimate.json`` is a first-principles ESTIMATE
for Llama-3-8B on one H100 (its ``source`` says how it was derived), not a measurement: there is no GPU
here. Lengths are ShareGPT's under the tiny model's tokenizer (a BPE trained on ShareGPT), not
Llama-3's. Each replica runs the real scheduler; requests reach a pool through the real ``BinRouter``
and, inside it, the replica with the fewest unfinished requests. Queues are FCFS, so only the routing
differs between rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tqdm import tqdm

from bench.experiments import harness
from bench.request_stats import MetricsSummary, Slo, find_capacity, summarize
from bench.sim.cost_model import StepCostModel
from bench.sim.simulator import ClusterSimulator, SimConfig, SimRequest
from bench.workload import WorkloadRequest, poisson_arrivals
from cluster.router import BinRouter
from pipeline.config import SchedulerConfig
from workers.checkpoint import load_tokenizer

ONE_POOL = "one pool (load balancing)"
TITLE = "At scale (simulated): capacity of 16 replicas, bins-to-pools vs one pool"


@dataclass(frozen=True)
class PolicySlo:
    """A policy and the SLO its capacity is measured against. Static-style batching cannot give a
    first token before the running batch ends (seconds), so it gets a batch-serving TTFT bound."""

    policy: str
    p99_ttft_s: float
    p99_tbt_s: float


@dataclass(frozen=True)
class Params(harness.SimulatedWorkload):
    num_requests: int = 2000
    num_bins: int = 4
    slos: tuple[PolicySlo, ...] = (PolicySlo("sarathi", 2.0, 0.1), PolicySlo("dynamic", 15.0, 0.1))
    max_num_seqs: int = 32
    """Per replica. Kept well below num_requests / num_replicas so that, above capacity, a queue builds
    within the run instead of every request being admitted at once (the run is finite)."""
    chunk_size: int = 512
    num_blocks: int = 25_000
    """KV blocks of 16 tokens per replica: (80 GB - 16 GB weights - ~10 GB activations and slack) at
    128 KiB per token is about 400k tokens."""
    low_rate_per_s: float = 10.0
    high_rate_per_s: float = 410.0
    iterations: int = 5


SIZES = {
    "full": Params(),
    "smoke": Params(
        num_requests=300, slos=(PolicySlo("sarathi", 2.0, 0.1), PolicySlo("dynamic", 15.0, 0.1)), iterations=2
    ),
}


@dataclass(frozen=True)
class Routing:
    name: str
    router: BinRouter
    lengths: harness.LengthEstimates


def routings(params: Params, policy: str, estimates: Sequence[harness.LengthEstimates]) -> list[Routing]:
    """One pool; for batch policies, one pool whose replicas batch within bins (Multi-Bin in a replica);
    then k bins on k pools."""
    k = params.num_bins
    found = [Routing(ONE_POOL, BinRouter.build([]), estimates[0])]
    if policy in ("static", "dynamic"):
        for e in estimates:
            router = BinRouter.build(e.bin_boundaries(k), num_pools=1)
            found.append(Routing(f"one pool, {k} bins in each replica ({e.source})", router, e))
    for e in estimates:
        router = BinRouter.build(e.bin_boundaries(k), num_pools=k)
        found.append(Routing(f"{k} bins -> {k} pools ({e.source})", router, e))
    return found


def simulate(
    params: Params,
    cost_model: StepCostModel,
    policy: str,
    routing: Routing,
    workload: Sequence[WorkloadRequest],
    rate_per_s: float,
) -> MetricsSummary:
    scheduler = SchedulerConfig(
        policy=policy,
        max_num_seqs=params.max_num_seqs,
        chunk_size=params.chunk_size,
        group_by_bin=policy in ("static", "dynamic"),
    )
    # Pools get replicas in proportion to the predicted output tokens they will serve (what a per-pool
    # autoscaler converges to); equal pools would starve the long-output bins' pool.
    work = [0.0] * routing.router.num_pools
    for predicted in routing.lengths.output_tokens:
        work[routing.router.route(predicted).pool_id] += predicted + 1
    config = SimConfig(
        scheduler=scheduler,
        num_replicas=params.num_replicas,
        num_blocks=params.num_blocks,
        pool_weights=tuple(work),
    )
    arrivals = poisson_arrivals(len(workload), rate_per_s, params.seed)
    requests = [
        SimRequest(arrival_s, len(r.prompt_token_ids), r.output_tokens, predicted)
        for r, arrival_s, predicted in zip(workload, arrivals, routing.lengths.output_tokens, strict=True)
    ]
    return summarize(ClusterSimulator(config, cost_model, routing.router).run(requests))


def capacity_row(
    params: Params,
    cost_model: StepCostModel,
    slo: Slo,
    policy: str,
    routing: Routing,
    workload: Sequence[WorkloadRequest],
) -> dict[str, Any]:
    """Bisect for the capacity of one (policy, routing); keep every probed rate's p99s."""
    summaries: dict[float, MetricsSummary] = {}

    def at_rate(rate_per_s: float) -> MetricsSummary:
        summaries[rate_per_s] = simulate(params, cost_model, policy, routing, workload, rate_per_s)
        return summaries[rate_per_s]

    capacity = find_capacity(at_rate, slo, params.low_rate_per_s, params.high_rate_per_s, params.iterations)
    at_capacity = summaries.get(capacity)
    return {
        "policy": policy,
        "routing": routing.name,
        "slo": asdict(slo),
        "capacity_per_s": capacity,
        "at_capacity": at_capacity.as_dict() if at_capacity else None,
        "probes": [
            {
                "rate_per_s": rate,
                "p99_ttft_s": s.p99_ttft_s,
                "p99_tbt_s": s.p99_tbt_s,
                "is_met": slo.is_met(s),
            }
            for rate, s in sorted(summaries.items())
        ],
    }


def run(params: Params, predictor: harness.PredictorChoice) -> dict[str, Any]:
    cost_model = StepCostModel.load(params.profile)
    workload = harness.sharegpt_workload(load_tokenizer(params.tokenizer_dir), params)
    estimates = harness.length_estimates(workload, predictor)
    cases = [
        (Slo(s.p99_ttft_s, s.p99_tbt_s), s.policy, routing)
        for s in params.slos
        for routing in routings(params, s.policy, estimates)
    ]
    rows = [
        capacity_row(params, cost_model, slo, policy, routing, workload)
        for slo, policy, routing in tqdm(cases, desc="scale capacity", unit="config")
    ]
    return {
        "experiment": "scale",
        "title": TITLE,
        "params": asdict(params),
        "profile_source": cost_model.source,
        "predictor": predictor.note,
        "rows": rows,
    }


def render(result: dict[str, Any]) -> str:
    p = result["params"]
    slos = "; ".join(
        f"`{s['policy']}` TTFT <= {s['p99_ttft_s']:g} s, TBT <= {s['p99_tbt_s'] * 1e3:.0f} ms"
        for s in p["slos"]
    )
    base = {r["policy"]: r["capacity_per_s"] for r in result["rows"] if r["routing"] == ONE_POOL}
    rows = []
    for r in result["rows"]:
        s = r["at_capacity"] or {}
        gain = r["capacity_per_s"] / base[r["policy"]] if base.get(r["policy"]) else None
        rows.append(
            [
                r["policy"],
                r["routing"],
                _capacity(r["capacity_per_s"], p),
                ("" if r["capacity_per_s"] < p["high_rate_per_s"] else ">= ") + f"{gain:.2f}x"
                if gain
                else "–",
                s.get("p99_ttft_s"),
                None if s.get("p99_tbt_s") is None else s["p99_tbt_s"] * 1e3,
                s.get("output_tokens_per_s"),
            ]
        )
    table = harness.markdown_table(
        [
            "policy",
            "routing",
            "capacity (req/s)",
            "vs one pool",
            "p99 TTFT (s)",
            "p99 TBT (ms)",
            "output tokens/s",
        ],
        rows,
    )
    return "\n\n".join(
        [
            f"**Simulated, on an estimated profile — not a GPU measurement.** Profile: {result['profile_source']}",
            f"{p['num_replicas']} replicas, {p['num_requests']} ShareGPT requests (prompts cut to "
            f"{p['max_prompt_tokens']} tokens, outputs to {p['max_output_tokens']}), Poisson arrivals; "
            f"max_num_seqs {p['max_num_seqs']}, chunk {p['chunk_size']}, {p['num_blocks']} KV blocks per replica; "
            f"`dynamic` batches are drawn from one bin. SLOs (p99): {slos}; capacity by bisection on "
            f"[{p['low_rate_per_s']}, "
            f"{p['high_rate_per_s']}] req/s, {p['iterations']} steps. Lengths: {result['predictor']}. Replicas "
            f"are split over pools in proportion to the predicted output tokens each pool serves (equal-mass "
            f"bins hold equal numbers of requests, not equal work). Each probe is a finite run of "
            f"{p['num_requests']} requests, so well above capacity its queue is shorter than in steady state.",
            table,
            harness.provenance(result),
        ]
    )


def _capacity(capacity_per_s: float, params: dict[str, Any]) -> str:
    """The bisection cannot see past its range: say so rather than print the bound as a measurement."""
    if capacity_per_s >= params["high_rate_per_s"]:
        return f">= {capacity_per_s:g} (range limit)"
    return f"{capacity_per_s:.3g}"


def plot(result: dict[str, Any], path: str) -> None:
    fig, (ax,) = harness.new_figure(width_in=7.0)
    policies = list(dict.fromkeys(r["policy"] for r in result["rows"]))
    routing_names = list(dict.fromkeys(r["routing"] for r in result["rows"]))
    width = 0.8 / len(routing_names)
    for i, name in enumerate(routing_names):
        by_policy = {r["policy"]: r["capacity_per_s"] for r in result["rows"] if r["routing"] == name}
        xs = [j + (i - (len(routing_names) - 1) / 2) * width for j in range(len(policies))]
        ax.bar(xs, [by_policy.get(p, 0.0) for p in policies], width, label=name)
    ax.set_xticks(range(len(policies)), policies)
    ax.set_ylabel("capacity under the SLO (requests/s)")
    ax.set_title(f"{result['params']['num_replicas']} simulated replicas (GPU profile is an estimate)")
    ax.legend(fontsize=8)
    harness.save_figure(fig, path)
