"""Run the experiments and write ``docs/RESULTS.md``: per model, one section per experiment, each a table
and a plot; and ``docs/results/targets.json``, every target's verdict.

    binserve bench report                                  # every experiment on the tiny model, then the report
    binserve bench report --model .models/smollm2-135m-instruct --size smollm2   # the same on SmolLM2
    binserve bench report --render-only                    # the report from the JSON already in docs/results

Each experiment module has ``TITLE``, ``Params``, ``SIZES`` (``full`` for the report, ``smoke`` to try
the code), ``run(params, predictor) -> dict``, ``render(result) -> str`` and ``plot(result, path)``.
Results are plain JSON (``docs/results/<model>/<name>.json``, ``<model>`` the checkpoint directory's name)
so the report can be re-rendered without rerunning.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from tqdm import tqdm

from bench import (
    conversation_capacity,
    conversation_probe,
    conversation_routing,
    conversations,
    demo_pairs,
    model_process,
    neighbour,
    overhead,
    path,
    predictor_results,
    prefix_overhead,
    served,
    trace_replay,
)
from bench.experiments import (
    bin_cuts,
    expected_remaining,
    hf,
    multibin,
    pipeline_bubbles,
    prefix_routing,
    queue_orders,
    replay_shapes,
    replica_routing,
    sarathi,
    scale,
    ssjf,
)
from bench.experiments.harness import (
    DEFAULT_MODEL_DIR,
    DEFAULT_REPORT,
    DEFAULT_RESULTS_DIR,
    PredictorChoice,
    fmt,
    load_average,
    load_predictor,
    markdown_table,
    run_meta,
    write_json,
)

EXPERIMENTS: dict[str, ModuleType] = {
    "ssjf": ssjf,
    "multibin": multibin,
    "sarathi": sarathi,
    "pipeline": pipeline_bubbles,
    "hf": hf,
    "scale": scale,
    "queue_orders": queue_orders,
}
# Results of their own, longer commands (a real cluster, ``binserve bench trace``): rendered and judged with
# the rest, not run by the report.
MEASURED_ELSEWHERE: dict[str, ModuleType] = {
    "replica_routing": replica_routing,
    "prefix_routing": prefix_routing,  # python -m bench.experiments.prefix_routing (simulated conversations)
    "prefix_routing_2replicas": prefix_routing,  # the same, --num-replicas 2 (SmolLM2's profile)
    "trace": trace_replay,
    "path": path,  # binserve bench path
    "conversations": conversations,  # binserve bench conversations
    "conversation_routing": conversation_routing,  # binserve bench conversations --serve-config
    "conversation_routing_long": conversation_routing,  # the same, 8 conversations of up to 6 turns
    "conversation_routing_spread": conversation_routing,  # the same, least_cost breaking ties by cache size
    "conversation_routing_split": conversation_routing,  # the same, queued prefill and decodes weighed apart
    "conversation_routing_expected": conversation_routing,  # the same, work counted as expected output
    "conversation_routing_linear": conversation_routing,  # the same, with the linear default predictor
    "replay_shapes": replay_shapes,  # python -m bench.experiments.replay_shapes (a real replay, simulated)
    "replay_shapes_point": replay_shapes,  # the same, --no-length-distribution
    "conversation_probe": conversation_probe,  # binserve bench conversation-probe
    "conversation_capacity": conversation_capacity,  # binserve bench conversation-capacity
    "conversation_probe_even": conversation_probe,  # the same, --new-token-ratio 1.1
    "conversation_probe_issue_shaped": conversation_probe,  # the same, and --like the conversation
    "prefix_overhead": prefix_overhead,  # binserve bench prefix-overhead
    "served": served,  # binserve bench served
    "model_process": model_process,  # python -m bench.model_process over alternating bench served runs
    "neighbour": neighbour,  # binserve bench neighbour: the served target's context
    "demo": demo_pairs,  # binserve bench demo
    "expected_remaining": expected_remaining,  # python -m bench.experiments.expected_remaining
    "expected_remaining_preempting": expected_remaining,  # the same with --num-blocks: KV runs short
    "predictor_choice": predictor_results,  # python -m tools.predictor.choice
    "predictor_variants": predictor_results,  # python -m tools.predictor.run_options --predictor ...
    "ingress_overhead": overhead,  # binserve bench overhead-summary over alternating bench serve runs
    "bin_cuts": bin_cuts,  # python -m bench.experiments.bin_cuts
    "bin_cuts_gpu": bin_cuts,  # the same on the GPU-shaped profile
}
SECTIONS: dict[str, ModuleType] = {**EXPERIMENTS, **MEASURED_ELSEWHERE}
USES_PREDICTOR = ("ssjf", "multibin", "scale", "queue_orders")
TARGETS_FILE = "targets.json"


def model_name(model_dir: str | None) -> str:
    """The name results are filed under: the checkpoint directory's name."""
    return Path(model_dir or DEFAULT_MODEL_DIR).name


def params_for(name: str, size: str, model_dir: str | None = None, overrides: Sequence[str] = ()) -> Any:
    """The experiment's parameters at ``size``, with ``--model`` and ``--set FIELD=VALUE`` applied."""
    module = EXPERIMENTS[name]
    if size not in module.SIZES:
        raise ValueError(f"size: must be one of {', '.join(module.SIZES)}, got {size!r}")
    params = module.SIZES[size]
    names = {f.name for f in dataclasses.fields(params)}
    if model_dir is not None and "model_dir" in names:
        params = dataclasses.replace(params, model_dir=model_dir)
    if model_dir is not None and "tokenizer_dir" in names:
        params = dataclasses.replace(params, tokenizer_dir=model_dir)
    for override in overrides:
        field_name, _, text = override.partition("=")
        if field_name not in names or not text:
            raise ValueError(
                f"--set: expected FIELD=VALUE with FIELD one of {', '.join(sorted(names))}, got {override!r}"
            )
        params = dataclasses.replace(
            params, **{field_name: _parse_like(getattr(params, field_name), text, field_name)}
        )
    return params


def _parse_like(current: Any, text: str, field_name: str) -> Any:
    """Parse ``text`` as the type of the field's current value (``none`` clears an optional number)."""
    if text.lower() == "none":
        return None
    try:
        if isinstance(current, bool):
            return text.lower() in ("1", "true", "yes")
        if isinstance(current, tuple) and all(isinstance(v, int) for v in current):
            return tuple(int(v) for v in text.split(","))
        if isinstance(current, tuple) and all(isinstance(v, float) for v in current):
            return tuple(float(v) for v in text.split(","))
        if isinstance(current, tuple) and all(isinstance(v, str) for v in current):
            return tuple(v.strip() for v in text.split(","))
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float) or current is None:
            return float(text)
        if isinstance(current, str):
            return text
    except ValueError as exc:
        raise ValueError(f"--set {field_name}: cannot parse {text!r} as {type(current).__name__}") from exc
    raise ValueError(f"--set {field_name}: this field cannot be set from the command line")


def run_experiment(
    name: str, params: Any, predictor: PredictorChoice, json_path: str | Path, command: str
) -> dict[str, Any]:
    """Run one experiment; write its JSON and, beside it, its plot (same name, ``.png``)."""
    module = EXPERIMENTS[name]
    start_s, load_at_start = time.perf_counter(), load_average()
    result = module.run(params, predictor)
    result["meta"] = run_meta(command, time.perf_counter() - start_s, load_at_start)
    json_path = Path(json_path)
    write_json(json_path, result)
    module.plot(result, str(json_path.with_suffix(".png")))
    return result


def run_all(
    names: Sequence[str],
    size: str,
    results_dir: str | Path,
    command: str,
    model_dir: str | None = None,
    predictor_dir: str | None = None,
) -> list[dict[str, Any]]:
    """Run every experiment of ``names`` that has ``size`` (the simulated-only ones have no ``real``)."""
    results = []
    for name in tqdm(names, desc="bench report", unit="experiment"):
        if size not in EXPERIMENTS[name].SIZES:
            tqdm.write(f"{name}: no {size!r} size, skipped")
            continue
        params = params_for(name, size, model_dir)
        path = Path(results_dir) / model_name(model_dir) / f"{name}.json"
        results.append(
            run_experiment(name, params, predictor_for(name, params, predictor_dir), path, command)
        )
        tqdm.write(f"{name}: {results[-1]['meta']['duration_s']:.0f} s, wrote {path}")
    return results


def predictor_for(name: str, params: Any, predictor_dir: str | None) -> PredictorChoice:
    """The length predictor an experiment uses: ``predictor_dir`` if given, else the one trained on the
    lengths it serves: the served model's own (``cluster/predictor/default``) when its requests carry the
    model's labels, ChatGPT's otherwise."""
    if name not in USES_PREDICTOR:
        return PredictorChoice(None, "")
    if predictor_dir is None and getattr(params, "labels", ""):
        from cluster.predictor import DEFAULT_DIR

        predictor_dir = str(DEFAULT_DIR)
    return load_predictor(predictor_dir)


def load_results(results_dir: str | Path) -> dict[str, dict[str, dict[str, Any]]]:
    """model -> experiment -> result, from ``results_dir/<model>/<experiment>.json``; the real models
    first, the tiny test model last."""
    found: dict[str, dict[str, dict[str, Any]]] = {}
    directories = [d for d in Path(results_dir).iterdir() if d.is_dir()] if Path(results_dir).is_dir() else []
    for directory in sorted(directories, key=lambda d: (d.name.startswith("tiny"), d.name)):
        for name in SECTIONS:
            path = directory / f"{name}.json"
            if not path.is_file():
                continue
            result = json.loads(path.read_text())
            # An experiment's own JSON names it; a file of that name from another command (the simulator's
            # queue_orders.json of a GPU profile) is not its result.
            if name in EXPERIMENTS and result.get("experiment") != name:
                continue
            found.setdefault(directory.name, {})[name] = result
    return found


def target_verdicts(results: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One entry per target of every result: what ``targets.json`` holds, each with the share of the exact
    lengths' gain that the target's lengths keep (null where the result has no oracle row to compare with)."""
    return [
        {
            "experiment": name,
            "model": model,
            "goal": t["target"],
            "reached": t["value"],
            "threshold": t.get("threshold"),
            "met": t["met"],
            "share_of_oracle_gain": share,
        }
        for model, by_name in results.items()
        for name, result in by_name.items()
        for t, share in zip(result.get("targets", []), oracle_shares(name, result), strict=True)
    ]


def oracle_shares(name: str, result: dict[str, Any]) -> list[float | None]:
    """Per target of ``result``: its own ``share_of_oracle_gain``, else its module's ``oracle_shares`` (from
    the stored rows, so re-rendering adds them to results measured before), else None."""
    stored = result.get("targets", [])
    computed = getattr(SECTIONS[name], "oracle_shares", None)
    shares = computed(result) if computed else []
    if len(shares) != len(stored):  # a module's targets changed since the result was measured
        shares = [None] * len(stored)
    return [t.get("share_of_oracle_gain", share) for t, share in zip(stored, shares, strict=True)]


ROUNDS_FILE = "ROUNDS.md"
"""Hand-written notes of each measurement round, copied to the end of the report."""


def render_report(
    results: dict[str, dict[str, dict[str, Any]]], results_dir: str | Path, report_path: str | Path
) -> str:
    """The whole RESULTS.md text; plot links are relative to the report's folder."""
    report_dir = Path(report_path).resolve().parent
    lines = [
        "# Results: SSJF, Multi-Bin batching and SARATHI on binserve",
        "",
        "Generated by `binserve bench report` (`bench/experiments/`); do not edit by hand. One section per "
        "model. Real runs are the real engine on this CPU. On the tiny seeded Llama (`.models/tiny-llama`, "
        "random weights) output lengths are forced (EOS ignored) and only the *relative* figures between "
        "policies carry over to real models. Simulated runs use the project's own scheduler and router "
        "under a step-cost model. Each table names its machine, load, date and command.",
        "",
        "## Targets",
        "",
        _targets_table(target_verdicts(results)),
    ]
    for model, by_name in results.items():
        lines += ["", f"## {model}"]
        missing = [name for name in EXPERIMENTS if name not in by_name]
        if missing and len(missing) < len(EXPERIMENTS):
            lines += [
                "",
                f"Not run on this model: {', '.join(missing)} (`binserve bench exp NAME --model DIR`).",
            ]
        for number, (name, module) in enumerate(SECTIONS.items(), start=1):
            result = by_name.get(name)
            if result is None:
                continue
            lines += ["", f"### {number}. {module.TITLE}", "", module.render(result)]
            png = Path(results_dir).resolve() / model / f"{name}.png"
            if png.is_file():
                lines += ["", f"![{module.TITLE}, {model}]({_relative(png, report_dir)})"]
    rounds = Path(results_dir) / ROUNDS_FILE
    if rounds.is_file():  # the notes of each measurement round, written when it was measured
        # One heading level down: the notes' title becomes a section of the report.
        lines += [
            "",
            *("#" + line if line.startswith("#") else line for line in rounds.read_text().splitlines()),
        ]
    return "\n".join(lines) + "\n"


def _targets_table(verdicts: list[dict[str, Any]]) -> str:
    rows = []
    for t in verdicts:
        verdict = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        value = fmt(t["reached"]) if t["reached"] is not None else "–"
        share = "–" if t["share_of_oracle_gain"] is None else f"{t['share_of_oracle_gain']:.0%}"
        rows.append([t["experiment"], t["model"], t["goal"], value, verdict, share])
    if not rows:
        return "No experiment with a target has been run."
    headers = ["experiment", "model", "target", "reached", "verdict", "share of the oracle's gain"]
    return markdown_table(headers, rows)


def _relative(path: Path, start: Path) -> str:
    try:
        return str(path.relative_to(start))
    except ValueError:
        return str(path)


def write_report(
    results_dir: str | Path = DEFAULT_RESULTS_DIR, report_path: str | Path = DEFAULT_REPORT
) -> Path:
    results = load_results(results_dir)
    text = render_report(results, results_dir, report_path)
    write_json(Path(results_dir) / TARGETS_FILE, target_verdicts(results))
    report_path = Path(report_path)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(text)
    return report_path
