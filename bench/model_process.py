"""``python -m bench.model_process``: the served path with the replica's model in the replica's process or apart.

    python -m bench.model_process docs/results/smollm2-135m-instruct/model_process/*.json \\
        --json docs/results/smollm2-135m-instruct/model_process.json

Combines ``binserve bench served`` runs of one model, run alternately on one machine, some serving
``deploy/bench-served.yaml`` with ``parallel.separate_model_process`` and some without. Each run's pairs put
the served path beside the engine alone on the same requests; this pools the pairs of every run per setting
and number of streams: the median of the pairs' served / engine-alone ratios (the worse API of each pair, as
issue 21's target reads them), their range, and the median chunk gap over the engine's step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench import write_report
from bench.experiments.harness import markdown_table, provenance, run_meta

SETTINGS = {False: "in the replica's process", True: "in a stage actor of its own"}


def pooled(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per setting and number of streams, over every pair of every run of that setting."""
    rows = []
    for apart in (False, True):
        pairs = [p for r in runs if r["separate_model_process"] is apart for p in r["pairs"]]
        for num_streams in dict.fromkeys(p["num_streams"] for p in pairs):
            at = [p for p in pairs if p["num_streams"] == num_streams]
            ratios = [min(s["tokens_per_s"] for s in p["served"]) / p["engine"]["tokens_per_s"] for p in at]
            gaps = [max(s["p50_chunk_gap_s"] for s in p["served"]) / p["engine"]["p50_step_s"] for p in at]
            rows.append(
                {
                    "separate_model_process": apart,
                    "num_streams": num_streams,
                    "num_pairs": len(at),
                    "served_over_engine": statistics.median(ratios),
                    "served_over_engine_range": [min(ratios), max(ratios)],
                    "served_tokens_per_s": statistics.median(
                        min(s["tokens_per_s"] for s in p["served"]) for p in at
                    ),
                    "engine_tokens_per_s": statistics.median(p["engine"]["tokens_per_s"] for p in at),
                    "gap_over_step": statistics.median(gaps),
                }
            )
    return rows


def combine(paths: list[str]) -> dict[str, Any]:
    runs = []
    for path in paths:
        run = json.loads(Path(path).read_text())
        if "separate_model_process" not in run:
            raise ValueError(
                f"{path}: a bench served result without separate_model_process (measured before it)"
            )
        runs.append(
            {
                "file": Path(path).name,
                "model": run["model"],
                "separate_model_process": run["separate_model_process"],
                "date": run["meta"]["date"],
                "command": run["meta"]["command"],
                "load_average": run["meta"].get("load_average"),
                "pairs": run["pairs"],
            }
        )
    models = {r["model"] for r in runs}
    if len(models) != 1:
        raise ValueError(f"runs: one model at a time, got {sorted(models)}")
    return {"model": models.pop(), "runs": runs, "rows": pooled(runs), "targets": []}


# ---- the report's section (``binserve bench report`` renders docs/results/<model>/model_process.json) -----

TITLE = "The served path with the replica's model in its process or in a stage actor of its own"


def render(result: dict[str, Any]) -> str:
    rows = [
        [
            SETTINGS[r["separate_model_process"]],
            str(r["num_streams"]),
            f"{r['engine_tokens_per_s']:,.0f}",
            f"{r['served_tokens_per_s']:,.0f}",
            f"{r['served_over_engine']:.2f}x ({r['served_over_engine_range'][0]:.2f}-"
            f"{r['served_over_engine_range'][1]:.2f})",
            f"{r['gap_over_step']:.2f}x",
            str(r["num_pairs"]),
        ]
        for r in result["rows"]
    ]
    header = ["the replica's model", "streams", "engine alone tok/s", "served tok/s (worse API)"]
    header += ["served / engine, worse API (range)", "chunk gap / step, worse API", "pairs"]
    runs = "\n".join(
        f"- `{r['file']}`: {SETTINGS[r['separate_model_process']]}, ended {r['date']}, load average "
        f"{(r['load_average'] or {}).get('start')} at the start, {(r['load_average'] or {}).get('end')} at the end"
        for r in result["runs"]
    )
    intro = (
        "`binserve bench served` runs of `deploy/bench-served.yaml` (one replica, `pp_size` 1, one torch thread), "
        "alternating the replica's model in the replica's own process (where it shares the interpreter lock with "
        "the replica's streaming) and in a stage actor of its own (`parallel.separate_model_process`), each "
        "against the engine alone in the benchmark's process on the same requests. Every pair of every run of a "
        "setting is pooled; each pair counts its worse API (gRPC or HTTP)."
    )
    return "\n".join(
        [
            intro,
            "",
            markdown_table(header, rows),
            "",
            "The runs, in the order they ran:",
            "",
            runs,
            "",
            provenance(result),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.model_process", description=__doc__.splitlines()[0]
    )
    parser.add_argument("runs", nargs="+", help="bench served JSON files of one model")
    parser.add_argument("--json", required=True, help="write the combined result here")
    args = parser.parse_args(argv)
    started_s = time.perf_counter()
    result = combine(args.runs)
    command = "python -m bench.model_process " + " ".join(sys.argv[1:] if argv is None else argv)
    result["meta"] = run_meta(command, time.perf_counter() - started_s, None)
    write_report(args.json, result)
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
