"""``binserve bench report`` and ``binserve bench exp NAME``: the papers' experiments on this system.

    binserve bench exp ssjf --size smoke --json /tmp/ssjf.json     # one experiment, small, to try it
    binserve bench report                                          # all seven on the tiny model (~15 min)
    binserve bench report --model .models/smollm2-135m-instruct --size real   # the real model (~70 min)

Registered under the ``bench`` group of ``cluster/commands.py``.
"""

from __future__ import annotations

import argparse

EXPERIMENT_NAMES = ("ssjf", "multibin", "sarathi", "pipeline", "hf", "scale", "queue_orders")
SIZES = ("full", "smoke", "real")
PREDICTOR_HELP = (
    "a trained length predictor's directory (default: cluster/predictor/chatgpt for ChatGPT's lengths, "
    "cluster/predictor/default for an experiment on the served model's own lengths)"
)
MODEL_HELP = (
    "checkpoint for the real-engine experiments and the scale workload's tokenizer (default .models/tiny-llama, "
    "written if missing); the pipeline experiment writes its own, larger synthetic checkpoint"
)


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPERIMENT_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"must be a comma-separated subset of {','.join(EXPERIMENT_NAMES)}")
    return names


def cmd_exp(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bench.experiments.harness import DEFAULT_RESULTS_DIR, this_command
    from bench.experiments.report import model_name, params_for, predictor_for, run_experiment

    json_path = Path(args.json or DEFAULT_RESULTS_DIR / model_name(args.model) / f"{args.name}.json")
    params = params_for(args.name, args.size, args.model, args.set)
    predictor = predictor_for(args.name, params, args.predictor)
    result = run_experiment(args.name, params, predictor, json_path, this_command())
    print(
        f"{args.name}: {result['meta']['duration_s']:.0f} s; wrote {json_path} and {json_path.with_suffix('.png')}"
    )
    for t in result.get("targets", []):
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        print(f"  target: {t['target']}: {t['value']} ({verdict})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bench.experiments.harness import this_command
    from bench.experiments.report import run_all, write_report

    if not args.render_only:
        run_all(args.only, args.size, args.results_dir, this_command(), args.model, args.predictor)
    path = write_report(args.results_dir, args.out)
    print(f"wrote {path}")
    return 0


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    # Only the light harness here: `binserve --help` must not import torch or the experiments.
    from bench.experiments.harness import DEFAULT_REPORT, DEFAULT_RESULTS_DIR

    p = bench_subparsers.add_parser("exp", help="one of the papers' experiments; writes JSON and a PNG plot")
    # queue-orders and queue_orders alike: the file and module names use underscores.
    p.add_argument("name", choices=EXPERIMENT_NAMES, type=lambda name: name.replace("-", "_"))
    p.add_argument(
        "--size",
        choices=SIZES,
        default="full",
        help="smoke: a minute-sized run; real: sized for a real --model",
    )
    p.add_argument("--json", help=f"write the result here (default {DEFAULT_RESULTS_DIR}/MODEL/NAME.json)")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--predictor", help=PREDICTOR_HELP)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override one of the experiment's Params, e.g. --set rate_per_s=0.8 or --set bin_counts=1,4",
    )
    p.set_defaults(func=cmd_exp)

    p = bench_subparsers.add_parser("report", help="run every experiment and regenerate docs/RESULTS.md")
    p.add_argument("--size", choices=SIZES, default="full")
    p.add_argument("--only", type=_names, default=list(EXPERIMENT_NAMES), help="comma-separated experiments")
    p.add_argument("--render-only", action="store_true", help="only re-render the report from the JSON")
    p.add_argument("--results-dir", default=str(DEFAULT_RESULTS_DIR), help="JSON and PNG files")
    p.add_argument("--out", default=str(DEFAULT_REPORT), help="the Markdown report")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--predictor", help=PREDICTOR_HELP)
    p.set_defaults(func=cmd_report)
