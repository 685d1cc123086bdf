"""``binserve profile`` and ``binserve simulate``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time


def cmd_profile(args: argparse.Namespace) -> int:
    import torch

    from bench.sim.profile import profile_engine
    from bench.workload import sharegpt_requests
    from pipeline.config_flags import engine_config_from_args
    from workers.checkpoint import load_tokenizer

    torch.set_num_threads(args.torch_threads)
    config = engine_config_from_args(args)
    from workers.checkpoint import load_config

    # Requests that fit the model: prompts up to half its length, outputs up to a quarter (at most 512 / 256).
    max_len = config.model.max_model_len or load_config(config.model.model_dir).max_position_embeddings
    workload = sharegpt_requests(
        load_tokenizer(config.model.model_dir),
        args.num_requests,
        seed=args.seed,
        max_prompt_tokens=min(512, max_len // 2),
        max_output_tokens=min(256, max_len // 4),
    )
    load_before, started = os.getloadavg()[0], time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    model = profile_engine(config, workload)
    # Step times depend on what else runs: the profile says when it was measured and how busy it was.
    model = dataclasses.replace(
        model,
        source=f"{model.source}; measured {started}, load average {load_before:.2f} at the start and "
        f"{os.getloadavg()[0]:.2f} at the end",
    )
    model.save(args.json)
    print(json.dumps(model.__dict__, indent=2))
    print(f"wrote {args.json}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from bench import write_report
    from bench.request_stats import summarize
    from bench.sim.cost_model import StepCostModel
    from bench.sim.simulator import ClusterSimulator, SimConfig, SimRequest
    from bench.workload import azure_requests, gamma_arrivals, sharegpt_requests, with_arrivals
    from cluster.router import BinRouter
    from pipeline.config import SchedulerConfig
    from pipeline.config_flags import config_from_flags

    cost_model = StepCostModel.load(args.profile)
    if args.workload == "sharegpt":
        if not args.tokenizer:
            raise ValueError("tokenizer: --tokenizer MODEL_DIR is required for the sharegpt workload")
        from workers.checkpoint import load_tokenizer

        workload = sharegpt_requests(load_tokenizer(args.tokenizer), args.num_requests, seed=args.seed)
        workload = with_arrivals(workload, gamma_arrivals(len(workload), args.rate, args.cv, args.seed))
    else:
        workload = azure_requests(args.workload.removeprefix("azure-"), args.num_requests, args.time_scale)
    lengths = sorted(r.output_tokens for r in workload)
    edges = [
        lengths[len(lengths) * i // args.num_bins] for i in range(1, args.num_bins)
    ]  # equal mass, oracle
    router = BinRouter.build(edges, num_pools=args.num_pools or args.num_bins)
    scheduler = config_from_flags(SchedulerConfig, args)
    sim = ClusterSimulator(SimConfig(scheduler=scheduler, num_replicas=args.num_replicas), cost_model, router)
    requests = [SimRequest(r.arrival_s, len(r.prompt_token_ids), r.output_tokens) for r in workload]
    summary = summarize(sim.run(requests))
    report = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "summary": summary.as_dict()}
    print(json.dumps(summary.as_dict(), indent=2))
    write_report(args.json, report)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from pipeline.config import SchedulerConfig
    from pipeline.config_flags import add_config_flags, add_engine_args

    p = subparsers.add_parser("profile", help="measure engine step times and fit the simulator's cost model")
    add_engine_args(p)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", required=True, help="write the profile here")
    p.set_defaults(func=cmd_profile)

    p = subparsers.add_parser("simulate", help="simulate a cluster running binserve's scheduler and router")
    p.add_argument("--profile", required=True, help="a step-cost profile (binserve profile)")
    p.add_argument("--workload", choices=("sharegpt", "azure-code", "azure-conv"), default="sharegpt")
    p.add_argument("--tokenizer", help="model directory whose tokenizer measures ShareGPT lengths")
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--rate", type=float, default=10.0, help="arrivals per second (sharegpt)")
    p.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of gaps; 1 is Poisson")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiplies Azure trace timestamps")
    add_config_flags(p.add_argument_group("SchedulerConfig"), SchedulerConfig)
    # A simulated cluster serves as the deployed one does: SSJF in each replica; batches from one bin.
    p.set_defaults(queue_order="ssjf", group_by_bin=True)
    p.add_argument("--num-replicas", type=int, default=1)
    p.add_argument("--num-bins", type=int, default=1)
    p.add_argument("--num-pools", type=int, default=None, help="default: one pool per bin")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report here")
    p.set_defaults(func=cmd_simulate)
