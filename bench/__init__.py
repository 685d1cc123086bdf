"""Benchmarks, the papers' experiments, workloads and the simulator: tools around the serving code."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path


def write_report(path: str | Path | None, report: dict) -> None:
    """Write a benchmark's JSON report to ``path`` (if given) and say where."""
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {path}")


def reporting(run: Callable[[argparse.Namespace], dict]) -> Callable[[argparse.Namespace], int]:
    """A command that runs ``run(args)`` and writes what it returns to ``--json``."""

    def command(args: argparse.Namespace) -> int:
        write_report(args.json, run(args))
        return 0

    return command


def add_engine_workload_flags(
    p: argparse.ArgumentParser, num_requests: int, max_prompt_tokens: int, max_output_tokens: int
) -> None:
    """The flags of a benchmark that runs ShareGPT prompts through the real engine in this process: the
    checkpoint, the workload's size and seed, the context, torch threads and the report's path."""
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--num-requests", type=int, default=num_requests)
    p.add_argument("--max-prompt-tokens", type=int, default=max_prompt_tokens)
    p.add_argument("--max-output-tokens", type=int, default=max_output_tokens)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--json", help="write the report here")
