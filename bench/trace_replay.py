"""``binserve bench trace``: a real local cluster replays the Azure conversation trace twice, length-blind
and length-aware, with the same requests, and the calibrated simulator predicts both runs beside it.

    binserve bench trace --config deploy/serve-local.yaml --model-dir .models/smollm2-135m-instruct \
        --num-requests 80 --load 0.8 --json docs/results/smollm2-135m-instruct/trace.json

- **Requests**: the held-out prompts of the served model's length labels (``--labels``; the predictor
  never trained on them), as chat messages with the deployment's default sampling, ``max_tokens`` 512
  and a per-request seed, so both runs ask for the same answers and the model stops where it would. The
  labels give each prompt's answer length under seed 0: the simulator's lengths.
- **Arrivals**: the first requests of the Azure 2023 conversation trace (``bench/data``), time-scaled so
  the mean rate is ``--load`` times the capacity. Capacity is measured on the length-blind cluster before
  its run: the output tokens/s it sustains with every batch slot full (a burst of one request per slot,
  each forced to 128 tokens), divided by the labels' mean answer length.
- **Simulator**: the same arrivals and label lengths under ``--profile`` (measured in one process, so its
  absolute times are the engine's alone; the served path adds the proxy, ingress and streaming).
- **Systems**: one pool of ``--replicas`` single-process replicas (``pp_size`` 1) of the config's model;
  length-blind is Serve's power-of-two choice with FCFS replicas, length-aware binserve's least predicted
  work with SSJF (the config's aging). Everything else is the config's.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from bench.sim.cost_model import StepCostModel
from bench.workload import DEFAULT_LABELS, WorkloadRequest, azure_requests, labelled_requests
from cluster.client import make_request
from pipeline.config import CacheConfig

DEFAULT_PROFILE = "profiles/cpu-smollm2-135m-instruct.json"
CALIBRATION_TOKENS = 128
"""Forced length of the capacity burst's answers."""
MAX_TOKENS = 512
"""What the labels were collected with: the simulator's lengths are the model's answers under this cap."""


def kv_bytes_per_token(model_dir: str) -> int:
    """Float32 keys and values of every layer for one token (``workers.partition.kv_block_bytes``)."""
    import torch

    from workers.checkpoint import load_config
    from workers.partition import kv_block_bytes

    config = load_config(model_dir)
    return kv_block_bytes(config, config.num_hidden_layers, 1, torch.float32)


@dataclass(frozen=True)
class System:
    name: str
    replica_routing: str
    queue_order: str


SYSTEMS = (
    System("length-blind (Serve power-of-two, FCFS)", "power_of_two", "fcfs"),
    System("length-aware (least predicted work, SSJF)", "least_predicted_work", "ssjf"),
)


def trace_workload(
    model_dir: str, labels: str, num_requests: int, trace: str = "conv"
) -> list[WorkloadRequest]:
    """Held-out labelled prompts (``labelled_requests``) with the trace's arrival times, unscaled."""
    requests = labelled_requests(model_dir, labels, num_requests, max_output_tokens=MAX_TOKENS)
    arrivals = [r.arrival_s for r in azure_requests(trace, num_requests)]
    return [replace(r, arrival_s=a) for r, a in zip(requests, arrivals, strict=True)]


def system_config(raw: dict[str, Any], system: System, replicas: int, kv_cache_bytes: int) -> dict[str, Any]:
    """The Serve config with one pool of ``replicas`` single-process replicas running ``system``, each
    with a KV pool of ``kv_cache_bytes`` (a whole model's layers, where a stage held a part)."""
    raw = copy.deepcopy(raw)
    for app in raw.get("applications") or []:
        args = app.setdefault("args", {})
        args["cache"] = {**(args.get("cache") or {}), "kv_cache_bytes": kv_cache_bytes}
        args["router"] = {**(args.get("router") or {}), "num_bins": 1}
        args["parallel"] = {**(args.get("parallel") or {}), "pp_size": 1}
        args["scheduler"] = {**(args.get("scheduler") or {}), "queue_order": system.queue_order}
        args["pools"] = {
            **(args.get("pools") or {}),
            "min_replicas": replicas,
            "max_replicas": replicas,
            "num_cpus": 1.0,
            "replica_routing": system.replica_routing,
        }
    return raw


def simulate(
    requests: Sequence[WorkloadRequest],
    predicted: Sequence[int],
    scheduler_args: dict[str, Any],
    system: System,
    replicas: int,
    cost_model: StepCostModel,
    num_blocks: int,
):
    """The simulator's run of ``system`` on these requests (label lengths) under ``cost_model``."""
    from bench.sim.simulator import ClusterSimulator, SimConfig, SimRequest
    from pipeline.config import SchedulerConfig

    scheduler = SchedulerConfig(**{**scheduler_args, "queue_order": system.queue_order})
    config = SimConfig(
        scheduler=scheduler,
        num_replicas=replicas,
        num_blocks=num_blocks,
        replica_routing=system.replica_routing,
    )
    sim_requests = [
        SimRequest(r.arrival_s, len(r.prompt_token_ids), r.output_tokens, p)
        for r, p in zip(requests, predicted, strict=True)
    ]
    return ClusterSimulator(config, cost_model).run(sim_requests)


def run_trace(args: argparse.Namespace) -> dict[str, Any]:
    from bench.experiments.harness import load_average, spearman, target
    from bench.request_stats import summarize
    from bench.serve import replay, report
    from cluster.local import serving_locally_at
    from cluster.predictor import DEFAULT_DIR, LengthPredictor

    raw = yaml.safe_load(Path(args.config).read_text()) or {}
    scheduler_args = dict((raw["applications"][0].get("args") or {}).get("scheduler") or {})
    requests = trace_workload(args.model_dir, args.labels, args.num_requests)
    kv_cache_bytes = args.kv_cache_mib * 2**20
    num_blocks = kv_cache_bytes // (kv_bytes_per_token(args.model_dir) * CacheConfig().block_size)
    cost_model = StepCostModel.load(args.profile)
    predicted = [
        int(n) for n in LengthPredictor.load(DEFAULT_DIR).predict([r.prompt for r in requests]).output_tokens
    ]

    def build(request: WorkloadRequest, index: int):
        return make_request(
            messages=[("user", request.prompt)], max_tokens=MAX_TOKENS, seed=args.seed * 100_003 + index
        )

    runs, timed = [], None
    for system in SYSTEMS:
        with tempfile.TemporaryDirectory() as tmp:
            config_path = Path(tmp) / "serve.yaml"
            config_path.write_text(yaml.safe_dump(system_config(raw, system, args.replicas, kv_cache_bytes)))
            with serving_locally_at(config_path, args.model_dir) as addresses:
                if timed is None:  # the first (length-blind) cluster measures the capacity
                    slots = args.replicas * int(scheduler_args.get("max_num_seqs", 32))
                    full_tokens_per_s = asyncio.run(full_batch_tokens_per_s(addresses.grpc, requests, slots))
                    capacity_rps = full_tokens_per_s / statistics.fmean(r.output_tokens for r in requests)
                    scale = len(requests) / (args.load * capacity_rps * requests[-1].arrival_s)
                    timed = [replace(r, arrival_s=r.arrival_s * scale) for r in requests]
                load_at_start, started = load_average(), time.perf_counter()
                served = asyncio.run(replay(addresses.grpc, timed, [True] * len(timed), build_request=build))
                duration_s = time.perf_counter() - started
        simulated = summarize(
            simulate(timed, predicted, scheduler_args, system, args.replicas, cost_model, num_blocks)
        )
        measured = report(served)
        lengths = [r.timed.response.usage.num_output_tokens for r in served if r.timed is not None]
        runs.append(
            {
                "system": system.name,
                "replica_routing": system.replica_routing,
                "queue_order": system.queue_order,
                "measured": measured,
                "mean_output_tokens": statistics.fmean(lengths) if lengths else None,
                "simulated": simulated.as_dict(),
                "duration_s": duration_s,
                "load_average": {"start": load_at_start, "end": load_average()},
            }
        )
        print(_line(runs[-1]), flush=True)
    requests = timed
    true_tokens = [r.output_tokens for r in requests]
    blind_run, aware_run = runs
    reduction = (
        1 - aware_run["measured"]["summary"]["mean_jct_s"] / blind_run["measured"]["summary"]["mean_jct_s"]
    )
    p99_ratio = aware_run["measured"]["summary"]["p99_jct_s"] / blind_run["measured"]["summary"]["p99_jct_s"]
    return {
        "workload": {
            "trace": "azure2023_conv",
            "num_requests": len(requests),
            "load": args.load,
            "capacity_rps": capacity_rps,
            "full_batch_output_tokens_per_s": full_tokens_per_s,
            "rate_per_s": len(requests) / requests[-1].arrival_s,
            "time_scale": scale,
            "mean_label_output_tokens": statistics.fmean(true_tokens),
            "predictor_spearman_vs_labels": spearman(true_tokens, predicted),
            "replicas": args.replicas,
            "scheduler": scheduler_args,
            "config": args.config,
            "profile": args.profile,
        },
        "runs": runs,
        "mean_jct_reduction": reduction,
        "p99_jct_ratio": p99_ratio,
        "targets": [
            target("mean JCT >= 25% lower than length-blind", reduction, 0.25),
            target("p99 JCT no worse than length-blind (ratio)", p99_ratio, 1.0, higher_is_better=False),
        ],
    }


async def full_batch_tokens_per_s(address: str, requests: Sequence[WorkloadRequest], slots: int) -> float:
    """Output tokens/s of the cluster with every batch slot full: ``slots`` requests at once (the
    workload's prompts, cycled), each forced to ``CALIBRATION_TOKENS`` tokens so all finish together."""
    from bench.serve import replay

    burst = [replace(requests[i % len(requests)], arrival_s=0.0) for i in range(slots)]

    def build(request: WorkloadRequest, index: int):
        return make_request(
            messages=[("user", request.prompt)], max_tokens=CALIBRATION_TOKENS, ignore_eos=True, seed=index
        )

    served = await replay(address, burst, [False] * len(burst), build_request=build)
    done = [r.timed for r in served if r.timed is not None]
    if not done:
        raise ValueError("capacity: no call of the calibration burst succeeded")
    makespan_s = max(t.end_s for t in done) - min(t.start_s for t in done)
    return sum(t.response.usage.num_output_tokens for t in done) / makespan_s


def _line(run: dict[str, Any]) -> str:
    m, s = run["measured"]["summary"], run["simulated"]
    return (
        f"{run['system']}: measured mean JCT {m['mean_jct_s']:.1f} s, p99 {m['p99_jct_s']:.1f} s, "
        f"{m['output_tokens_per_s']:.1f} tok/s; simulated mean JCT {s['mean_jct_s']:.1f} s, p99 {s['p99_jct_s']:.1f} s; "
        f"failures {run['measured']['failures']}; {run['duration_s']:.0f} s"
    )


def cmd_bench_trace(args: argparse.Namespace) -> int:
    from bench.experiments.harness import run_meta, this_command

    if not 0 < args.load <= 2:
        raise ValueError(f"load: must be in (0, 2], got {args.load}")
    if args.replicas < 1:
        raise ValueError(f"replicas: must be at least 1, got {args.replicas}")
    started = time.perf_counter()
    result = run_trace(args)
    result["meta"] = run_meta(
        this_command(), time.perf_counter() - started, result["runs"][0]["load_average"]["start"]
    )
    print(
        f"length-aware vs length-blind: mean JCT {result['mean_jct_reduction']:+.1%} lower, "
        f"p99 JCT ratio {result['p99_jct_ratio']:.2f}"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser(
        "trace",
        help="a real local cluster replays the Azure conversation trace, length-aware vs length-blind",
    )
    p.add_argument(
        "--config", default="deploy/serve-local.yaml", help="the Serve config both systems start from"
    )
    p.add_argument("--model-dir", default=".models/smollm2-135m-instruct")
    p.add_argument(
        "--labels", default=str(DEFAULT_LABELS), help="the served model's length labels (held-out prompts)"
    )
    p.add_argument(
        "--profile", default=DEFAULT_PROFILE, help="step-cost profile for the simulator's prediction"
    )
    p.add_argument("--num-requests", type=int, default=80)
    p.add_argument("--load", type=float, default=0.8, help="mean arrival rate as a fraction of capacity")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--kv-cache-mib", type=int, default=512, help="KV pool of each replica (all its layers)")
    p.add_argument("--seed", type=int, default=0, help="sampling seeds of the requests")
    p.add_argument("--json", help="write the result here")
    p.set_defaults(func=cmd_bench_trace)


TITLE = "A real cluster: the Azure conversation trace, length-aware vs length-blind"


def render(result: dict[str, Any]) -> str:
    """The report's section: one row per system, measured and simulated."""
    from bench.experiments.harness import markdown_table, provenance

    w = result["workload"]
    rows = []
    for run in result["runs"]:
        m, s = run["measured"]["summary"], run["simulated"]
        rows.append(
            [
                run["system"],
                m["mean_jct_s"],
                m["p50_jct_s"],
                m["p99_jct_s"],
                m["p99_ttft_s"],
                m["output_tokens_per_s"],
                run["mean_output_tokens"],
                s["mean_jct_s"],
                s["p99_jct_s"],
                sum(run["measured"]["failures"].values()),
            ]
        )
    header = [
        "system",
        "mean JCT (s)",
        "p50 JCT (s)",
        "p99 JCT (s)",
        "p99 TTFT (s)",
        "output tokens/s",
        "mean answer (tokens)",
        "simulated mean JCT (s)",
        "simulated p99 JCT (s)",
        "failed calls",
    ]
    text = (
        f"{w['replicas']} replicas of the model in one pool, each one process with one torch thread, behind the "
        f"real Serve gRPC proxy and ingress on this machine; scheduler {w['scheduler']}. The first "
        f"{w['num_requests']} arrivals of the Azure 2023 conversation trace, time-scaled to {w['load']:.0%} of the "
        f"measured capacity ({w['capacity_rps']:.3f} requests/s: {w['full_batch_output_tokens_per_s']:.0f} output "
        f"tokens/s with every batch slot full, over the labels' mean answer of "
        f"{w['mean_label_output_tokens']:.0f} tokens), so {w['rate_per_s']:.3f} requests/s. Held-out prompts of the "
        f"model's length labels as chat messages, default sampling with a seed per request (both runs get the "
        f"same answers), answers up to {MAX_TOKENS} tokens; the trained predictor's Spearman correlation with the "
        f"labels on these prompts is {w['predictor_spearman_vs_labels']:.2f}. Times are taken at the client. "
        f"Length-aware: mean JCT {result['mean_jct_reduction']:+.1%} lower, p99 JCT "
        f"{result['p99_jct_ratio']:.2f}x the length-blind one. The simulated columns are the calibrated "
        f"simulator's prediction of the same run (profile `{w['profile']}`, one process, label lengths)."
    )
    return "\n\n".join([text, markdown_table(header, rows), provenance(result)])
