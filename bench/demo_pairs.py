"""``binserve bench demo``: ``binserve demo``'s output tokens/s, one code tree against another, in pairs.

    binserve bench demo --before /tmp/demo-before --model-dir $PWD/.models/smollm2-135m-instruct \
        --json docs/results/smollm2-135m-instruct/demo.json

``make demo``'s fixed workload (``tools/demo.py``: ``deploy/serve-local.yaml``, a few dozen chat questions
at Poisson arrivals) is run by ``binserve demo`` in a subprocess with this interpreter and ``PYTHONPATH`` set
to each tree, alternately (before, after; then after, before; ...), and the output tokens/s it prints is
read from its summary line. Rendered by ``binserve bench report``.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import write_report
from bench.experiments.harness import load_average, markdown_table, provenance, run_meta, this_command
from pipeline.config_flags import positive_int

SUMMARY = re.compile(r"^(\d+) requests in ([\d.]+) s: (\d+) output tokens/s", re.MULTILINE)
"""``tools/demo.py``'s summary line (the same in the trees compared)."""


def commit_of(tree: str) -> str:
    return subprocess.run(
        ["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()


def run_once(label: str, tree: str, model_dir: str) -> dict[str, Any]:
    """One ``binserve demo`` in ``tree``; its output tokens/s, or the tail of its output if it printed none."""
    load_at_start, started = load_average(), time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
    done = subprocess.run(
        [sys.executable, "-m", "tools.cli", "demo", "--model-dir", model_dir],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    found = SUMMARY.search(done.stdout)
    run = {
        "label": label,
        "commit": commit_of(tree),
        "date_utc": started,
        "load_average": {"start": load_at_start, "end": load_average()},
        "returncode": done.returncode,
        "num_requests": int(found[1]) if found else None,
        "wall_s": float(found[2]) if found else None,
        "output_tokens_per_s": float(found[3]) if found else None,
    }
    if not found:
        run["output_tail"] = (done.stdout + done.stderr)[-2000:]
    print(
        f"{label} ({run['commit']}): {run['output_tokens_per_s']} output tokens/s, load {run['load_average']}"
    )
    return run


def cmd_bench_demo(args: argparse.Namespace) -> int:
    started_s, load_at_start = time.perf_counter(), load_average()
    trees = {"before": args.before, "after": args.after}
    runs: list[dict[str, Any]] = []
    for i in range(args.pairs):
        for label in ("before", "after") if i % 2 == 0 else ("after", "before"):
            runs.append(run_once(label, trees[label], str(Path(args.model_dir).resolve())))
            medians = {  # the JSON after every run: a run cut off keeps the runs it finished
                name: statistics.median(r["output_tokens_per_s"] for r in runs if r["label"] == name)
                for name in trees
                if [r for r in runs if r["label"] == name]
                and all(r["output_tokens_per_s"] is not None for r in runs if r["label"] == name)
            }
            result = {
                "runs": runs,
                "median_output_tokens_per_s": medians,
                "meta": run_meta(this_command(), time.perf_counter() - started_s, load_at_start),
            }
            write_report(args.json, result)
    return 0 if len(medians) == len(trees) else 1


TITLE = "`make demo` before and after: output tokens/s on its fixed workload"


def render(result: dict[str, Any]) -> str:
    rows = [
        [
            r["label"],
            r["commit"],
            r["date_utc"],
            f"{r['output_tokens_per_s']:.0f}" if r["output_tokens_per_s"] is not None else "failed",
            f"{r['wall_s']:.1f}" if r["wall_s"] is not None else "-",
            f"{r['load_average']['start']} / {r['load_average']['end']}",
        ]
        for r in result["runs"]
    ]
    header = ["code", "commit", "started (UTC)", "output tokens/s", "wall s", "load average start / end"]
    medians = ", ".join(f"{label} {v:.0f}" for label, v in result["median_output_tokens_per_s"].items())
    intro = (
        "`binserve demo` (`make demo`: `deploy/serve-local.yaml`, two pools of two-stage pipelines, the "
        "demo's chat questions at Poisson arrivals, sampled) run with one interpreter and `PYTHONPATH` set to "
        "each code tree, alternately. Output tokens/s is the demo's own summary line; its requests arrive "
        "at a fixed rate, so it measures the cluster under a light, open load, not its ceiling."
    )
    return "\n".join(
        [intro, "", markdown_table(header, rows), "", f"Medians: {medians}.", "", provenance(result)]
    )


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser("demo", help="binserve demo's output tokens/s, two code trees in pairs")
    p.add_argument("--before", required=True, help="the code tree run as 'before' (a git worktree)")
    p.add_argument("--after", default=".", help="the code tree run as 'after' (default: this one)")
    p.add_argument("--model-dir", required=True, help="the SmolLM2 checkpoint directory")
    p.add_argument("--pairs", type=positive_int, default=2, help="alternating before/after pairs")
    p.add_argument("--json", help="write the result here (docs/results/smollm2-135m-instruct/demo.json)")
    p.set_defaults(func=cmd_bench_demo)
