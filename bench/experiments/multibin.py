"""Experiment 2, Multi-Bin batching (Guldogan et al., 2024): static-batching throughput with k bins.

    binserve bench exp multibin             # writes docs/results/MODEL/multibin.json and .png

A burst of ShareGPT requests runs under ``static`` batching of size B with ``group_by_bin``: each batch
is drawn from one bin of similar lengths, so it waits less for its longest member. Bins are equal-mass:
of the true lengths (oracle) or the predictor's ``bin_boundaries(k)`` applied to its predictions. Beside
the real engine, the simulator runs the same requests (on this CPU's profile and on the GPU estimate),
and a uniform-length workload under a unit step cost, which is what the paper's closed form describes:

    E[T_k] = l_min + (l_max - l_min) * ((k - 1) / (2k) + B / (k (B + 1))),   throughput = B / E[T_k]

The closed form assumes a batch costs its longest member's length in steps. On this CPU every running
request adds attention work to each step, so finished requests make the rest of a batch cheaper and
binning gains less than the formula says; the GPU-estimate column shows a weight-read-dominated step.
The simulator starts a replica's first step at the first arrival, so in a burst its first static batch
holds one request (the engine's replay admits the whole burst first): a small, known difference.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bench.experiments import harness
from bench.replay import replay
from bench.request_stats import summarize
from bench.sim.cost_model import StepCostModel
from bench.sim.simulator import ClusterSimulator, SimConfig, SimRequest
from bench.workload import DEFAULT_LABELS
from cluster.router import BinRouter
from pipeline.config import SchedulerConfig

TITLE = "Multi-Bin batching: throughput vs number of bins"
UNIT_STEP = StepCostModel(base_s=1.0, prefill_token_s=0.0, decode_token_s=0.0, kv_token_s=0.0)


@dataclass(frozen=True)
class Params(harness.EngineWorkload):
    batch_size: int = 8
    """B. The closed form's gain at k=4 grows with B (1.48x at B=8, 1.54x at 16, 1.6x as B grows), but on
    this CPU every running request adds attention cost to each step, so a larger B gains less here (and
    takes longer to run); B=8 with 64 requests gives every one of 8 bins one full batch."""
    bin_counts: tuple[int, ...] = (1, 2, 4, 8)
    profile: str = str(harness.REPO_DIR / "profiles" / "cpu-tiny-llama.json")
    gpu_profile: str = str(harness.REPO_DIR / "profiles" / "gpu-llama3-8b-h100-estimate.json")
    """An estimate (see its ``source``): where a step's fixed weight read dominates, as on a GPU, a
    static batch's time follows its longest member more closely than on this CPU."""
    num_uniform_requests: int = 2048


SIZES = {
    "full": Params(),
    "smoke": Params(
        num_requests=16, max_prompt_tokens=64, max_output_tokens=128, batch_size=4, num_uniform_requests=256
    ),
    # A real model with its own lengths (about 27 minutes here); the simulated columns use its measured profile.
    "real": Params(
        labels=str(DEFAULT_LABELS),
        num_requests=32,
        max_prompt_tokens=1024,
        max_output_tokens=512,
        bin_counts=(1, 4),
        profile=str(harness.REPO_DIR / "profiles" / "cpu-smollm2-135m-instruct.json"),
    ),
}


def closed_form_batch_time(l_min: float, l_max: float, batch_size: int, num_bins: int) -> float:
    """Expected steps of a static batch of B lengths uniform on [l_min, l_max], drawn from one of k
    equal-mass bins: the expected maximum of B uniforms on a bin of width (l_max - l_min) / k, averaged
    over the bins."""
    k, b = num_bins, batch_size
    return l_min + (l_max - l_min) * ((k - 1) / (2 * k) + b / (k * (b + 1)))


def closed_form_throughput(l_min: float, l_max: float, batch_size: int, num_bins: int) -> float:
    """Requests per step."""
    return batch_size / closed_form_batch_time(l_min, l_max, batch_size, num_bins)


def bin_ids(lengths: Sequence[int], edges: Sequence[int]) -> list[int]:
    router = BinRouter.build(edges)
    return [router.bin_of(n) for n in lengths]


def _scheduler(params: Params) -> SchedulerConfig:
    return SchedulerConfig(policy="static", max_num_seqs=params.batch_size, group_by_bin=True)


def _real(
    engines: harness.Engines, params: Params, workload, estimate: harness.LengthEstimates, k: int
) -> float:
    bins = bin_ids(estimate.output_tokens, estimate.bin_boundaries(k))
    measured = replay(
        engines.engine(_scheduler(params)),
        workload,
        predicted=list(estimate.output_tokens),
        bins=bins,
        desc=f"multibin real {estimate.source} k={k}",
    )
    return summarize(measured.metrics).output_tokens_per_s


def simulated_throughput(
    params: Params, cost_model: StepCostModel, requests: list[SimRequest], edges: list[int]
) -> float:
    sim = ClusterSimulator(
        SimConfig(scheduler=_scheduler(params)), cost_model, BinRouter.build(edges, num_pools=1)
    )
    return summarize(sim.run(requests)).output_tokens_per_s


def uniform_requests(params: Params, k: int) -> list[SimRequest]:
    """Lengths uniform on [1, l_max], stratified so every bin holds the same multiple of B (no partial
    batch), as the closed form assumes."""
    l_max = params.max_output_tokens
    edges = [l_max * i // k for i in range(k + 1)]
    per_bin = params.num_uniform_requests // k
    rng = random.Random(params.seed + k)
    lengths = [
        rng.randint(lo + 1, hi) for lo, hi in zip(edges, edges[1:], strict=False) for _ in range(per_bin)
    ]
    rng.shuffle(lengths)
    return [SimRequest(0.0, 1, n) for n in lengths]


def run(params: Params, predictor: harness.PredictorChoice) -> dict[str, Any]:
    engines = harness.Engines(params.model_dir)
    workload = harness.sharegpt_workload(engines.tokenizer, params)
    estimates = harness.length_estimates(workload, predictor)
    cost_model = StepCostModel.load(params.profile)
    gpu_cost_model = StepCostModel.load(params.gpu_profile)
    l_max = params.max_output_tokens
    rows = []
    for k in params.bin_counts:
        row: dict[str, Any] = {"num_bins": k}
        for estimate in estimates:
            row[f"real_{estimate.source}"] = _real(engines, params, workload, estimate, k)
            sim_requests = [
                SimRequest(0.0, len(r.prompt_token_ids), r.output_tokens, p)
                for r, p in zip(workload, estimate.output_tokens, strict=True)
            ]
            edges = estimate.bin_boundaries(k)
            row[f"sim_{estimate.source}"] = simulated_throughput(params, cost_model, sim_requests, edges)
            row[f"sim_gpu_{estimate.source}"] = simulated_throughput(
                params, gpu_cost_model, sim_requests, edges
            )
        uniform_edges = [l_max * i // k for i in range(1, k)]
        row["sim_uniform"] = simulated_throughput(
            params, UNIT_STEP, uniform_requests(params, k), uniform_edges
        )
        row["closed_form"] = closed_form_throughput(0, l_max, params.batch_size, k) * (l_max + 1) / 2
        rows.append(row)
    gains = relative_to_one_bin(rows)
    return {
        "experiment": "multibin",
        "title": TITLE,
        "params": asdict(params),
        "predictor": predictor.note,
        "num_kv_blocks": engines.num_blocks,
        "rows": rows,
        "gains": gains,
        "targets": [
            harness.target(
                "4 bins >= 1.5x the throughput of 1 bin, oracle lengths (real engine)",
                _gain(gains, 4, "real_oracle"),
                1.5,
            ),
            harness.target(
                "4 bins >= 1.2x the throughput of 1 bin, predicted lengths (real engine)",
                _gain(gains, 4, "real_predicted"),
                1.2,
            ),
        ],
    }


def oracle_shares(result: dict[str, Any]) -> list[float | None]:
    """Per target: the share of the oracle's 4-bin throughput gain over 1 bin (the oracle's own: 1, where it
    gains)."""
    oracle, predicted = (_gain(result["gains"], 4, column) for column in ("real_oracle", "real_predicted"))
    oracle_gain = None if oracle is None else oracle - 1
    predicted_gain = None if predicted is None else predicted - 1
    return [
        harness.share_of_gain(oracle_gain, oracle_gain),
        harness.share_of_gain(predicted_gain, oracle_gain),
    ]


def relative_to_one_bin(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every throughput column divided by its value at one bin."""
    first = rows[0]
    return [{key: (v / first[key] if key != "num_bins" else v) for key, v in row.items()} for row in rows]


def _gain(gains: list[dict[str, Any]], k: int, column: str) -> float | None:
    return next((g.get(column) for g in gains if g["num_bins"] == k), None)


COLUMNS = {
    "real_oracle": "real, oracle",
    "real_predicted": "real, predicted",
    "sim_oracle": "sim, oracle",
    "sim_predicted": "sim, predicted",
    "sim_gpu_oracle": "sim GPU est., oracle",
    "sim_gpu_predicted": "sim GPU est., predicted",
    "sim_uniform": "sim, uniform",
    "closed_form": "closed form",
}


def render(result: dict[str, Any]) -> str:
    p = result["params"]
    columns = [c for c in COLUMNS if c in result["rows"][0]]
    rows = [
        [row["num_bins"]] + [f"{row[c]:.4g} ({gain[c]:.2f}x)" for c in columns]
        for row, gain in zip(result["rows"], result["gains"], strict=True)
    ]
    return "\n\n".join(
        [
            f"Static batching, B = {p['batch_size']}, `group_by_bin`, a burst of "
            f"{harness.workload_text(p, p['num_requests'])}. Cells: output tokens/s (gain over 1 bin). Real = the engine on "
            f"`{p['model_dir'].rsplit('/', 1)[-1]}`; sim = the simulator with `{p['profile'].rsplit('/', 1)[-1]}` (this CPU) on the same requests; "
            f"sim GPU est. = the same with `{p['gpu_profile'].rsplit('/', 1)[-1]}`, an estimate, not a "
            f"measurement; uniform = "
            f"{p['num_uniform_requests']} lengths uniform on [1, {p['max_output_tokens']}] under a unit step cost, "
            f"tokens per step; closed form = B/E[T_k] x mean length, the paper's formula for that uniform case. "
            f"Lengths: {result['predictor']}.",
            harness.markdown_table(["bins k", *(COLUMNS[c] for c in columns)], rows),
            harness.provenance(result),
        ]
    )


def plot(result: dict[str, Any], path: str) -> None:
    fig, (ax,) = harness.new_figure(width_in=6.0)
    ks = [g["num_bins"] for g in result["gains"]]
    for column, label in COLUMNS.items():
        if column in result["gains"][0]:
            style = "--" if column == "closed_form" else "-"
            ax.plot(ks, [g[column] for g in result["gains"]], style, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("bins k")
    ax.set_ylabel("throughput / throughput at k=1")
    ax.set_title(f"Multi-Bin static batching, B={result['params']['batch_size']}")
    ax.legend(fontsize=8)
    harness.save_figure(fig, path)
