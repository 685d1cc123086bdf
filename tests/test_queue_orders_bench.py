"""``binserve bench exp queue_orders``'s bookkeeping: the step's budget from its cost, each request's time
alone, length classes, the repeats' averages and changes against FCFS, the share of the oracle's gain, the
targets, and the report reading it (and not the simulator's file of the same name). Nothing here runs the
model or asserts a timing."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest

from bench.experiments import queue_orders as q
from bench.experiments import report
from bench.experiments.harness import write_json
from pipeline.engine import RequestMetrics

IDLE = q.StepCost(base_s=0.049, token_s=0.0035)
"""SmolLM2's step here on an idle machine."""


def test_budget_is_the_most_tokens_whose_step_fits_the_limit() -> None:
    assert IDLE.budget_tokens(0.12, 256) == 20  # (120 - 49) / 3.5 = 20.3
    assert IDLE.budget_tokens(0.15, 256) == 28
    assert IDLE.budget_tokens(0.12, 16) == 16  # the cap
    assert q.StepCost(0.336, 0.014).budget_tokens(0.12, 256) == 2  # a loaded machine: the floor
    assert q.StepCost(0.01, 0.0).budget_tokens(0.12, 256) == 256  # flat cost: the cap


def test_step_cost_is_the_fitted_line_and_needs_two_sizes() -> None:
    tokens = [1, 5, 10, 20, 40]
    cost = q.fit_step_cost(tokens, [IDLE.step_s(n) for n in tokens])
    assert (cost.base_s, cost.token_s) == (pytest.approx(0.049), pytest.approx(0.0035))
    with pytest.raises(ValueError, match="step_tokens"):
        q.fit_step_cost([8, 8, 8], [0.1, 0.2, 0.3])


def test_service_time_is_prompt_chunks_then_one_step_per_further_token() -> None:
    # 45 prompt tokens at a budget of 20: chunks of 20, 20 and 5 (the last gives the first token), then 9 steps.
    expected = 2 * IDLE.step_s(20) + IDLE.step_s(5) + 9 * IDLE.step_s(1)
    assert q.service_s(45, 10, 20, IDLE) == pytest.approx(expected)
    assert q.service_s(20, 1, 20, IDLE) == pytest.approx(IDLE.step_s(20))


def test_length_classes_are_terciles_of_the_true_length() -> None:
    assert q.length_classes([5, 1, 9, 3, 7, 2]) == ["medium", "short", "long", "medium", "long", "short"]
    assert q.length_classes([4, 4, 4]) == ["short", "medium", "long"]  # ties keep workload order


def _metrics(jct_s: float, prompt: int, output: int) -> RequestMetrics:
    return RequestMetrics(
        arrival_s=0.0,
        admitted_s=0.0,
        token_times_s=(0.1, jct_s),
        finished_s=jct_s,
        num_prompt_tokens=prompt,
        num_output_tokens=output,
        num_preemptions=0,
        predicted_output_tokens=None,
        bin_id=0,
    )


def test_mean_slowdown_per_class_is_jct_over_time_alone() -> None:
    alone_short, alone_long = q.service_s(10, 2, 20, IDLE), q.service_s(10, 50, 20, IDLE)
    records = [_metrics(2 * alone_short, 10, 2), _metrics(3 * alone_long, 10, 50)]
    slowdown = q.mean_slowdown_by_class(records, ["short", "long"], 20, IDLE)
    assert slowdown["short"] == pytest.approx(2.0) and slowdown["long"] == pytest.approx(3.0)
    assert math.isnan(slowdown["medium"])


def _run(order: str, lengths: str | None, mean_jct_s: float, p99_jct_s: float, repeat: int = 0) -> dict:
    figures = dict.fromkeys(q.FIGURES, 0.1) | {"mean_jct_s": mean_jct_s, "p99_jct_s": p99_jct_s}
    slowdown = {"short": 2.0, "medium": 1.5, "long": 1.2}
    return {"load": q.TARGET_LOAD, "repeat": repeat, "order": order, "lengths": lengths, **figures} | {
        "mean_slowdown": slowdown,
        "load_average": 1.5,
    }


RUNS = [
    _run("fcfs", None, 10.0, 30.0),
    _run("fcfs", None, 12.0, 34.0, repeat=1),  # the repeats' mean: 11 s and 32 s
    _run("hrrn", "exact", 6.0, 30.0),
    _run("hrrn", "exact", 7.2, 34.0, repeat=1),  # 6.6 s: -40%
    _run("hrrn", "predicted", 8.8, 32.0),  # -20%: half the oracle's cut
    _run("ssjf", "exact", 12.1, 32.0),  # +10%: the oracle gains nothing
    _run("ssjf", "predicted", 9.9, 40.0),  # -10%
]


def test_rows_average_the_repeats_and_compare_with_fcfs_at_the_same_load() -> None:
    rows = {(r["order"], r["lengths"]): r for r in q.averaged(RUNS)}
    fcfs, hrrn_exact, hrrn_predicted = rows["fcfs", None], rows["hrrn", "exact"], rows["hrrn", "predicted"]
    assert (fcfs["num_repeats"], fcfs["mean_jct_s"], fcfs["p99_jct_s"]) == (2, 11.0, 32.0)
    assert fcfs["mean_jct_change"] == 0.0 and fcfs["share_of_oracle_gain"] is None
    assert hrrn_exact["mean_jct_change"] == pytest.approx(-0.4) and hrrn_exact["share_of_oracle_gain"] is None
    assert hrrn_predicted["mean_jct_change"] == pytest.approx(-0.2)
    assert hrrn_predicted["share_of_oracle_gain"] == pytest.approx(0.5)
    assert rows["ssjf", "predicted"]["share_of_oracle_gain"] is None  # no oracle gain to share
    assert hrrn_predicted["mean_slowdown"] == {"short": 2.0, "medium": 1.5, "long": 1.2}
    # A run cut short before a load's FCFS run (a checkpoint): that load has nothing to compare with yet.
    assert q.averaged([{**r, "load": 1.1} for r in RUNS[2:]]) == []


def test_targets_judge_the_predicted_order_that_cuts_mean_jct_most() -> None:
    cut, tail, share = q.targets(q.averaged(RUNS))
    assert "hrrn, predicted lengths, 0.9x load" in cut["target"]
    assert (cut["value"], cut["met"]) == (pytest.approx(0.2), False)  # 20% < 25%
    assert (tail["value"], tail["met"]) == (pytest.approx(0.0), True)  # 32 s against 32 s
    assert (share["value"], share["met"]) == (pytest.approx(0.5), False)
    assert [t["share_of_oracle_gain"] for t in (cut, tail, share)] == [pytest.approx(0.5)] * 3
    unmeasured = q.targets(q.averaged(RUNS[:2]))  # no run with predicted lengths: listed, not judged
    assert [(t["value"], t["met"], t["share_of_oracle_gain"]) for t in unmeasured] == [(None, None, None)] * 3


def _result() -> dict:
    rows = q.averaged(RUNS)
    return {
        "experiment": "queue_orders",
        "title": q.TITLE,
        "params": asdict(q.SIZES["real"]),
        "predictor": "stand-in",
        "prediction_quality": {"predicted": {"mae_tokens": 40.0, "spearman": 0.4}},
        "step_cost": {
            **asdict(IDLE),
            "num_steps": 19,
            "min_tokens": 1,
            "max_tokens": 42,
            "budget_tokens": 20,
        },
        "chunk_size": 20,
        "max_num_seqs": 10,
        "service_s_per_token": IDLE.step_s(20),
        "capacity_per_s": 0.5,
        "capacity_p99_tbt_s": 0.14,
        "workload": {
            "num_requests": 32,
            "mean_prompt_tokens": 70.0,
            "mean_output_tokens": 100.0,
            "class_mean_output_tokens": {"short": 40.0, "medium": 120.0, "long": 128.0},
        },
        "runs": RUNS,
        "rows": rows,
        "targets": q.targets(rows),
        "meta": {
            "machine": {"cpu": "Test CPU", "num_cores": 2, "platform": "Linux", "python": "3.11"},
            "date": "2026-01-01T00:00:00+00:00",
            "command": "binserve bench exp queue_orders",
            "duration_s": 1.0,
            "load_average": {"start": 1.0, "end": 2.0},
        },
    }


def test_report_renders_it_and_skips_the_simulators_file_of_the_same_name(tmp_path: Path) -> None:
    write_json(tmp_path / "smollm2-135m-instruct" / "queue_orders.json", _result())
    q.plot(_result(), str(tmp_path / "smollm2-135m-instruct" / "queue_orders.png"))
    # The simulator's queue_orders.json of a GPU profile: another command's result, not this experiment's.
    write_json(tmp_path / "gpu-estimate" / "queue_orders.json", {"rows": [], "targets": [{"target": "x"}]})
    path = report.write_report(tmp_path, tmp_path / "RESULTS.md")
    text = path.read_text()
    assert "gpu-estimate" not in text
    assert "| 0.9x | hrrn | predicted |" in text and "fixed at `chunk_size` 20" in text
    verdicts = json.loads((tmp_path / "targets.json").read_text())
    assert [v["experiment"] for v in verdicts] == ["queue_orders"] * 3
    assert all(v["share_of_oracle_gain"] == pytest.approx(0.5) for v in verdicts)


def test_cli_takes_either_spelling() -> None:
    from tests.test_experiments import _parser

    args = _parser().parse_args(["bench", "exp", "queue-orders", "--size", "smoke"])
    assert args.name == "queue_orders"
    assert report.params_for("queue_orders", "smoke", overrides=["loads=0.7,1.1"]).loads == (0.7, 1.1)


def test_every_target_carries_its_share_of_the_oracle_gain() -> None:
    """Computed from the stored rows where the result predates the field, so re-rendering adds it."""
    from bench.experiments import replica_routing
    from bench.experiments.harness import target
    from tests.test_experiments import _fake_results

    fake = _fake_results()  # SSJF: the oracle cuts mean JCT 50%, the predictor 30%, in every mode
    multibin = {
        "gains": [{"num_bins": 4, "real_oracle": 1.5, "real_predicted": 1.2}],
        "targets": [target("oracle 4 bins", 1.5, 1.5), target("predicted 4 bins", 1.2, 1.2)],
    }
    aware = "length-aware (least predicted work, SSJF)"
    routing = {
        "slos": ["mean JCT <= 4 s"],
        "rows": [
            {
                "system": "length-blind (Serve power-of-two, FCFS)",
                "predictions": "oracle",
                "mean JCT <= 4 s": 100,
            },
            {"system": aware, "predictions": "oracle", "mean JCT <= 4 s": 150},
            {"system": aware, "predictions": "synthetic, Spearman 0.54", "mean JCT <= 4 s": 120},
        ],
    }
    routing["targets"] = replica_routing.targets(routing)
    results = {
        "m": {
            "ssjf": fake["ssjf"],
            "multibin": multibin,
            "sarathi": fake["sarathi"],
            "queue_orders": _result(),
            "replica_routing": routing,
        }
    }
    shares = [(v["experiment"], v["share_of_oracle_gain"]) for v in report.target_verdicts(results)]
    assert shares == [
        *[("ssjf", pytest.approx(0.6))] * 3,
        ("multibin", 1.0),
        ("multibin", pytest.approx(0.4)),
        ("sarathi", None),  # no oracle row
        *[("queue_orders", pytest.approx(0.5))] * 3,
        ("replica_routing", 1.0),
        ("replica_routing", pytest.approx(0.4)),
    ]


def test_a_checkpoint_before_any_run_renders_with_its_targets_unmeasured(tmp_path: Path) -> None:
    early = {**_result(), "runs": [], "rows": [], "targets": q.targets([])}
    q.plot(early, str(tmp_path / "queue_orders.png"))
    assert "fixed at `chunk_size` 20" in q.render(early) and "at p99 TBT 140 ms" in q.render(early)
    assert [t["met"] for t in early["targets"]] == [None] * 3
