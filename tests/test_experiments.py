"""The experiments' pure parts: the closed form, bins, predictor plumbing, target verdicts, rendering and
the CLI. Nothing here runs the model or asserts a timing."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from bench.experiments import cli, hf, multibin, pipeline_bubbles, report, sarathi, scale, ssjf
from bench.experiments.harness import (
    PredictorChoice,
    fmt,
    oracle_lengths,
    predicted_lengths,
    prediction_quality,
    spearman,
    write_json,
)
from bench.workload import WorkloadRequest
from cluster.predictor.lengths import Prediction

META = {
    "machine": {"cpu": "Test CPU", "num_cores": 2, "platform": "Linux", "python": "3.11"},
    "date": "2026-01-01T00:00:00+00:00",
    "command": "binserve bench exp test",
    "duration_s": 1.0,
}


def _requests(lengths: list[int]) -> list[WorkloadRequest]:
    return [WorkloadRequest(f"prompt {i}", (1, 2, 3), n) for i, n in enumerate(lengths)]


class HalvingPredictor:
    """A stand-in with the LengthPredictor interface: predicts half the prompt's length in characters."""

    def predict(self, prompts: list[str]) -> Prediction:
        lengths = [max(1, len(p) // 2) for p in prompts]
        return Prediction(output_tokens=lengths, bucket_ids=[0] * len(prompts))

    def bin_boundaries(self, num_bins: int) -> list[int]:
        return [10 * i for i in range(1, num_bins)]


# ---- closed form and bins ----------------------------------------------------------------------


def test_closed_form_is_the_expected_maximum_for_one_bin_and_approaches_the_mean_with_many() -> None:
    # One bin: the expected maximum of B uniforms on [0, L] is L * B / (B + 1).
    assert multibin.closed_form_batch_time(0, 100, 8, 1) == pytest.approx(100 * 8 / 9)
    # Many bins: each batch's lengths are nearly equal, so a batch takes the mean length.
    assert multibin.closed_form_batch_time(0, 100, 8, 10_000) == pytest.approx(50, rel=1e-3)
    gain = multibin.closed_form_throughput(0, 512, 8, 4) / multibin.closed_form_throughput(0, 512, 8, 1)
    assert gain == pytest.approx(1.48, abs=0.01)


def test_uniform_workload_in_the_simulator_matches_the_closed_form() -> None:
    params = replace(multibin.Params(), max_output_tokens=64, batch_size=4, num_uniform_requests=256)
    for k in (1, 4):
        requests = multibin.uniform_requests(params, k)
        edges = [64 * i // k for i in range(1, k)]
        tokens_per_step = multibin.simulated_throughput(params, multibin.UNIT_STEP, requests, edges)
        expected = multibin.closed_form_throughput(0, 64, 4, k) * sum(r.output_tokens for r in requests) / 256
        assert tokens_per_step == pytest.approx(expected, rel=0.05)


def test_oracle_bins_are_equal_mass_and_bin_ids_follow_the_router_convention() -> None:
    lengths = list(range(1, 101))
    estimate = oracle_lengths(_requests(lengths))
    edges = estimate.bin_boundaries(4)
    ids = multibin.bin_ids(lengths, edges)
    assert [ids.count(b) for b in range(4)] == [25, 25, 25, 25]
    assert multibin.bin_ids([edges[0], edges[0] + 1], edges) == [0, 1]  # upper edges are inclusive


def test_predicted_lengths_come_from_an_injected_predictor() -> None:
    requests = [WorkloadRequest("x" * n, (1,), n) for n in (40, 8, 100)]
    estimate = predicted_lengths(requests, HalvingPredictor())
    assert estimate.source == "predicted"
    assert estimate.output_tokens == (20, 4, 50)
    assert estimate.bin_boundaries(3) == [10, 20]
    quality = prediction_quality([40, 8, 100], estimate.output_tokens)
    assert quality["mae_tokens"] == pytest.approx((20 + 4 + 50) / 3)
    assert quality["spearman"] == pytest.approx(1.0)


def test_spearman_handles_order_reversal_and_ties() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5]))


# ---- targets -------------------------------------------------------------------------------------


def _ssjf_rows() -> list[dict]:
    rows = []
    for mode in ssjf.MODES:
        for order, jct in (("fcfs", 10.0), ("ssjf oracle", 5.0), ("ssjf predicted", 7.0)):
            rows.append({"mode": mode, "order": order, "mean_jct_s": jct, "p99_jct_s": 2 * jct})
            rows[-1].update(mean_ttft_s=1.0, output_tokens_per_s=100.0)
    ssjf._add_reductions(rows)
    return rows


def test_ssjf_reductions_are_against_fcfs_in_the_same_mode() -> None:
    rows = _ssjf_rows()
    assert [r["mean_jct_change"] for r in rows[:3]] == pytest.approx([0.0, -0.5, -0.3])
    verdicts = ssjf.targets(rows)
    assert [t["met"] for t in verdicts] == [False, False, False]  # 30% < 35%
    assert verdicts[0]["value"] == pytest.approx(0.3)


def _sarathi_rows() -> list[dict]:
    rows = [
        {"config": "sarathi chunk 64", "policy": "sarathi", "busy_tokens_per_s": 85.0, "p99_tbt_s": 0.01},
        {"config": "sarathi chunk 256", "policy": "sarathi", "busy_tokens_per_s": 95.0, "p99_tbt_s": 0.025},
        {"config": "prefill_first", "policy": "prefill_first", "busy_tokens_per_s": 100.0, "p99_tbt_s": 0.1},
        {"config": "static", "policy": "static", "busy_tokens_per_s": 90.0, "p99_tbt_s": 0.05},
    ]
    for r in rows:
        r["chunk_size"] = int(r["config"].split()[-1]) if r["policy"] == "sarathi" else None
        r.update(output_tokens_per_s=1.0, mean_ttft_s=1.0, p99_ttft_s=1.0, p50_tbt_s=0.005)
    sarathi._add_ratios(rows)
    return rows


def test_sarathi_target_takes_the_best_chunk_within_ten_percent_throughput() -> None:
    [verdict] = sarathi.targets(_sarathi_rows())
    assert verdict["value"] == pytest.approx(4.0)  # chunk 256; chunk 64 lost 15%
    assert "chunk 256" in verdict["target"]
    assert verdict["met"] is True


# ---- rendering -----------------------------------------------------------------------------------


def _fake_results() -> dict[str, dict]:
    multibin_rows = [
        {"num_bins": k, "real_oracle": 100.0 * g, "sim_oracle": 90.0 * g, "sim_uniform": g, "closed_form": g}
        for k, g in ((1, 1.0), (2, 1.3), (4, 1.6), (8, 1.8))
    ]
    return {
        "ssjf": {
            "params": asdict(ssjf.SIZES["smoke"]),
            "predictor": "stand-in",
            "prediction_quality": {"predicted": {"mae_tokens": 50.0, "spearman": 0.5}},
            "workload": {"num_requests": 10, "mean_output_tokens": 40.0, "arrivals": "burst at t=0"},
            "rows": _ssjf_rows(),
            "targets": ssjf.targets(_ssjf_rows()),
        },
        "multibin": {
            "params": asdict(multibin.SIZES["smoke"]),
            "predictor": "stand-in",
            "rows": multibin_rows,
            "gains": multibin.relative_to_one_bin(multibin_rows),
            "targets": [],
        },
        "sarathi": {
            "params": asdict(sarathi.SIZES["smoke"]),
            "workload": {
                "mean_prompt_tokens": 90.0,
                "max_prompt_tokens": 256,
                "rate_per_s": 5.4,
                "burst_capacity_per_s": 6.0,
            },
            "rows": _sarathi_rows(),
            "targets": sarathi.targets(_sarathi_rows()),
        },
        "hf": {
            "params": asdict(hf.SIZES["smoke"]),
            "workload": {"num_requests": 8, "mean_prompt_tokens": 40.0, "mean_output_tokens": 30.0},
            "engine": {"wall_s": 1.0, "output_tokens": 240, "output_tokens_per_s": 240.0},
            "hf": {"wall_s": 2.0, "output_tokens": 240, "output_tokens_per_s": 120.0},
            "speedup_vs_hf": 2.0,
        },
    }


def test_report_renders_every_section_with_provenance_and_plots(tmp_path: Path) -> None:
    results = {name: {**r, "experiment": name, "meta": META} for name, r in _fake_results().items()}
    for name, result in results.items():
        write_json(tmp_path / "tiny-llama" / f"{name}.json", result)
        report.EXPERIMENTS[name].plot(result, str(tmp_path / "tiny-llama" / f"{name}.png"))
        assert (tmp_path / "tiny-llama" / f"{name}.png").stat().st_size > 0
    # A second model's section: the real model's runs come first.
    smollm2 = {
        **results["ssjf"],
        "params": {**results["ssjf"]["params"], "model_dir": "/m/smollm2-135m-instruct"},
    }
    write_json(tmp_path / "smollm2-135m-instruct" / "ssjf.json", smollm2)
    path = report.write_report(tmp_path, tmp_path / "RESULTS.md")
    text = path.read_text()
    assert text.index("## smollm2-135m-instruct") < text.index("## tiny-llama")
    assert text.count("Test CPU, 2 cores") == 5
    assert "| multibin |" not in text  # no targets given for it here
    assert "**missed**" in text and "| sarathi | tiny-llama |" in text
    assert "| 4 | 160 (1.60x) | 144 (1.60x) | 1.6 (1.60x) | 1.6 (1.60x) |" in text
    assert "![SSJF vs FCFS: job completion time, tiny-llama](tiny-llama/ssjf.png)" in text
    assert "Not run on this model: pipeline, scale, queue_orders (`binserve bench exp NAME" in text
    verdicts = json.loads((tmp_path / "targets.json").read_text())
    assert {v["model"] for v in verdicts} == {"smollm2-135m-instruct", "tiny-llama"}
    for v in verdicts:
        keys = {"experiment", "model", "goal", "reached", "threshold", "met", "share_of_oracle_gain"}
        assert set(v) == keys
        assert v["met"] in (True, False, None)
    assert [v for v in verdicts if v["model"] == "smollm2-135m-instruct"] == [
        {**v, "model": "smollm2-135m-instruct"}
        for v in verdicts
        if v["model"] == "tiny-llama" and v["experiment"] == "ssjf"
    ]


def test_pipeline_section_renders_the_pipeline_bench_rows(tmp_path: Path) -> None:
    rows = [
        {"policy": p, "output_tokens_per_s": t, "bubble_fraction": b, "bubble_s": b * 10}
        | {"stage_utilisation": [0.5, 0.6], "num_micro_batches": 40}
        for p, t, b in (("sarathi", 120.0, 0.2), ("prefill_first", 100.0, 0.4))
    ]
    result = {
        "params": {**asdict(pipeline_bubbles.Params()), "checkpoint_dir": "x"},
        "layer_ranges": [[0, 4], [4, 8]],
        "rows": rows,
        "bubble_time_reduction": 2.0,
        "throughput_gain": 1.2,
        "meta": META,
    }
    text = pipeline_bubbles.render(result)
    assert "| sarathi | 120 | 20.0% | 2 | 50%, 60% | 40 |" in text
    pipeline_bubbles.plot(result, str(tmp_path / "pipeline.png"))


def test_scale_runs_in_the_simulator_and_renders(tmp_path: Path, tiny_llama: str) -> None:
    params = replace(
        scale.SIZES["smoke"], tokenizer_dir=tiny_llama, num_requests=24, num_replicas=4, iterations=1
    )
    result = scale.run(params, PredictorChoice(HalvingPredictor(), "stand-in"))
    names = [(r["policy"], r["routing"]) for r in result["rows"]]
    assert names == [
        ("sarathi", "one pool (load balancing)"),
        ("sarathi", "4 bins -> 4 pools (oracle)"),
        ("sarathi", "4 bins -> 4 pools (predicted)"),
        ("dynamic", "one pool (load balancing)"),
        ("dynamic", "one pool, 4 bins in each replica (oracle)"),
        ("dynamic", "one pool, 4 bins in each replica (predicted)"),
        ("dynamic", "4 bins -> 4 pools (oracle)"),
        ("dynamic", "4 bins -> 4 pools (predicted)"),
    ]
    result["meta"] = META
    text = scale.render(result)
    assert "not a GPU measurement" in text and "ESTIMATE" in text
    scale.plot(result, str(tmp_path / "scale.png"))
    write_json(tmp_path / "scale.json", result)
    json.loads((tmp_path / "scale.json").read_text())


def test_json_has_no_nan_and_fmt_shows_missing_values_as_a_dash(tmp_path: Path) -> None:
    write_json(tmp_path / "r.json", {"a": math.nan, "b": [1.0, math.inf], "c": (2, 3)})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": None, "b": [1.0, None], "c": [2, 3]}
    assert fmt(None) == fmt(math.nan) == "–"
    assert fmt(0.012345) == "0.0123"
    assert fmt(12345.6) == "12,346"


def test_gpu_profile_is_a_labelled_estimate() -> None:
    from bench.sim.cost_model import StepCostModel

    model = StepCostModel.load(scale.Params().profile)
    assert model.source.startswith("ESTIMATE, NOT A MEASUREMENT")
    assert 0.004 < model.base_s < 0.008  # 16 GB of weights at ~3 TB/s


# ---- the command line ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="binserve")
    bench = parser.add_subparsers(dest="command").add_parser("bench")
    cli.register(bench.add_subparsers(dest="bench", required=True))
    return parser


def test_cli_registers_exp_and_report_under_bench() -> None:
    args = _parser().parse_args(["bench", "exp", "multibin", "--size", "smoke", "--json", "/tmp/m.json"])
    assert (args.func, args.name, args.size, args.json) == (cli.cmd_exp, "multibin", "smoke", "/tmp/m.json")
    args = _parser().parse_args(["bench", "report", "--only", "ssjf,hf", "--render-only"])
    assert (args.func, args.only, args.render_only) == (cli.cmd_report, ["ssjf", "hf"], True)
    assert _parser().parse_args(["bench", "report"]).only == list(cli.EXPERIMENT_NAMES)


def test_cli_rejects_unknown_experiments() -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["bench", "report", "--only", "ssjf,nope"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["bench", "exp", "nope"])


def test_every_experiment_has_full_and_smoke_sizes_and_takes_a_model_override() -> None:
    assert list(report.EXPERIMENTS) == list(cli.EXPERIMENT_NAMES)
    for name in report.EXPERIMENTS:
        assert {"full", "smoke"} <= set(report.EXPERIMENTS[name].SIZES)
        params = report.params_for(name, "smoke", "/models/x")
        if hasattr(params, "model_dir"):
            assert params.model_dir == "/models/x"
    assert report.params_for("scale", "full", "/models/x").tokenizer_dir == "/models/x"
    with pytest.raises(ValueError, match="size"):
        report.params_for("ssjf", "huge")


def test_set_overrides_params_by_the_type_of_their_default() -> None:
    params = report.params_for("ssjf", "smoke", overrides=["rate_per_s=0.8", "num_requests=5"])
    assert (params.rate_per_s, params.num_requests) == (0.8, 5)
    assert report.params_for("multibin", "smoke", overrides=["bin_counts=1,4"]).bin_counts == (1, 4)
    assert report.params_for("ssjf", "full", overrides=["rate_per_s=none"]).rate_per_s is None
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        report.params_for("ssjf", "smoke", overrides=["nope=1"])
    with pytest.raises(ValueError, match="num_requests"):
        report.params_for("ssjf", "smoke", overrides=["num_requests=many"])
    with pytest.raises(ValueError, match="cannot be set"):
        report.params_for("scale", "smoke", overrides=["slos=1"])
    args = _parser().parse_args(["bench", "exp", "ssjf", "--set", "seed=3", "--set", "batch_size=4"])
    assert args.set == ["seed=3", "batch_size=4"]


def test_real_size_runs_the_served_models_own_lengths_with_its_own_predictor() -> None:
    params = report.params_for("ssjf", "real", "/models/smollm2")
    assert (
        params.labels.endswith("smollm2-135m-instruct.seed0.jsonl") and params.model_dir == "/models/smollm2"
    )
    assert "cluster/predictor/default" in report.predictor_for("ssjf", params, None).note
    assert "cluster/predictor/chatgpt" in report.predictor_for("ssjf", ssjf.SIZES["full"], None).note
    assert report.predictor_for("sarathi", params, None).predictor is None
    # The simulated-only experiments have no real size: a real report skips them.
    assert "real" not in report.EXPERIMENTS["scale"].SIZES
    assert report.run_all(["scale"], "real", "/nonexistent", "cmd") == []


def test_report_quick_mode_end_to_end(tmp_path: Path, tiny_llama: str) -> None:
    """`binserve bench report --size smoke`: every experiment runs, files its JSON and plot, and the report
    and the targets are regenerated from them."""
    from tools.cli import main

    results, out = tmp_path / "results", tmp_path / "RESULTS.md"
    args = ["bench", "report", "--size", "smoke", "--model", tiny_llama, "--results-dir", str(results)]
    assert main([*args, "--out", str(out)]) == 0
    model = report.model_name(tiny_llama)
    for name in report.EXPERIMENTS:
        result = json.loads((results / model / f"{name}.json").read_text())
        assert result["meta"]["load_average"]["end"] is not None
        assert (results / model / f"{name}.png").stat().st_size > 0
    text = out.read_text()
    assert f"## {model}" in text and "Not run on this model" not in text
    assert text.count("load average") >= len(report.EXPERIMENTS)
    verdicts = json.loads((results / "targets.json").read_text())
    assert {v["experiment"] for v in verdicts} >= {"ssjf", "multibin", "sarathi", "pipeline"}
    assert all(v["model"] == model and v["met"] in (True, False, None) for v in verdicts)


def _routing_run(rates: list[float], jcts: dict[str, list[float]]) -> dict:
    from bench.experiments import replica_routing

    params = asdict(replica_routing.Params(rates=tuple(rates), report_rate_per_s=rates[0]))
    summary = {
        f: 0.0 for f in ("makespan_s", "output_tokens_per_s", "requests_per_s", "p50_jct_s", "p99_jct_s")
    }
    summary |= {f: 0.0 for f in ("mean_ttft_s", "p50_ttft_s", "p99_ttft_s", "p50_tbt_s", "p99_tbt_s")}
    rows = [
        {
            "predictions": "oracle",
            "spearman": 1.0,
            "system": system,
            "by_rate": [
                {"rate_per_s": r, **summary, "num_requests": 10, "mean_jct_s": j, "mean_queueing_s": 0.0}
                for r, j in zip(rates, by_rate, strict=True)
            ],
        }
        for system, by_rate in jcts.items()
    ]
    return {
        "params": params,
        "slos": ["mean JCT <= 4 s", "p99 TTFT <= 2 s"],
        "rows": rows,
        "profile_source": "x",
    }


def test_routing_runs_on_two_grids_merge_and_judge_the_capacity_ratio() -> None:
    from bench.experiments import replica_routing

    blind, aware = "length-blind (Serve power-of-two, FCFS)", "length-aware (least predicted work, SSJF)"
    coarse = _routing_run([200.0, 300.0, 400.0], {blind: [3.0, 5.0, 9.0], aware: [2.0, 3.5, 6.0]})
    fine = _routing_run([260.0, 340.0], {blind: [4.5, 7.0], aware: [3.0, 3.9]})
    merged = replica_routing.merge_runs(coarse, fine)
    assert merged["params"]["rates"] == [200.0, 260.0, 300.0, 340.0, 400.0]
    capacities = {r["system"]: r["mean JCT <= 4 s"] for r in merged["rows"]}
    assert capacities == {blind: 200.0, aware: 340.0}  # blind fails at 260, aware holds up to 340
    verdict, tail = replica_routing.targets(merged)
    assert (verdict["value"], verdict["met"]) == (1.7, True)
    # The tail target: >= 1.2x under mean JCT and >= 1.0x under p99 TTFT (every p99 TTFT here is 0, so
    # both rows hold it up to 400): the lesser of 1.7 / 1.2 and 1.0 / 1.0.
    assert (tail["value"], tail["met"]) == (1.0, True)
    assert "1.70x" in replica_routing.render(merged)


def test_routing_rows_for_chosen_queue_orders() -> None:
    from bench.experiments import replica_routing

    systems = replica_routing.systems_of("fcfs,hrrn")
    assert [(routing, order) for _, routing, order in systems] == [
        ("power_of_two", "fcfs"),
        ("least_predicted_work", "fcfs"),
        ("least_predicted_work", "hrrn"),
    ]
    assert systems[2][0] == "length-aware (least predicted work, HRRN)"
    with pytest.raises(ValueError, match="queue_order: must be one of fcfs, ssjf, ssjf_bounded, hrrn"):
        replica_routing.systems_of("ssjf,lifo")


def test_conversation_turns_resend_their_history_and_stop_at_the_context() -> None:
    from bench.conversations import Conversation
    from bench.experiments import prefix_routing

    params = prefix_routing.Params(max_model_len=200, template_tokens=2)
    conversations = [
        Conversation(("a", "b", "c"), (30, 40, 500), 0.5, (1.0, 2.0, 3.0)),
        Conversation(("d", "e"), (10, 20), 1.5, (4.0, 5.0)),
    ]
    turns = prefix_routing.conversation_requests(conversations, [[5, 6, 7], [8, 9]], params)
    # The first conversation's third turn would not fit 200 tokens: it ends after two.
    assert [(t.prompt_tokens, t.output_tokens, t.follows) for t in turns] == [
        (7, 30, None),
        (7 + 30 + 8, 40, 0),
        (10, 10, None),
        (10 + 10 + 11, 20, 2),
    ]
    assert [t.arrival_s for t in turns] == [0.5, 1.0, 1.5, 4.0]  # a follow-up: its think time
    first, second = turns[:2]
    assert (
        second.prompt_token_ids
        == first.prompt_token_ids + first.output_token_ids + second.prompt_token_ids[37:]
    )
    ids = [i for t in turns for i in t.prompt_token_ids + t.output_token_ids]
    assert min(ids) >= params.min_token_id and max(ids) < params.max_token_id
    assert turns == prefix_routing.conversation_requests(conversations, [[5, 6, 7], [8, 9]], params)
    moved = prefix_routing.at_rate(turns, 10.0, seed=0)
    assert [t.arrival_s for t in moved][1::2] == [1.0, 4.0]  # only first turns move
    # Predicted lengths are capped at max_tokens, as the ingress caps the estimate it hands the router.
    predicted = prefix_routing.with_predictions(turns, spearman=0.1, seed=0, max_tokens=15)
    assert all(1 <= t.predicted_output_tokens <= 15 for t in predicted)


def test_prefix_routing_renders_and_judges_least_cost_against_the_best_other_rule() -> None:
    from bench.experiments import prefix_routing

    def row(rule: str, caching: bool, rate: float, ttft: float) -> dict:
        return {
            "rule": rule,
            "caching": caching,
            "rate_per_s": rate,
            "num_turns": 10,
            "mean_ttft_s": ttft,
            "p99_ttft_s": 2 * ttft,
            "mean_follow_up_ttft_s": None,
            "mean_jct_s": 1.0,
            "p99_tbt_s": 0.01,
            "output_tokens_per_s": 100.0,
            "hit_rate_tokens": 0.5,
            "num_preemptions": 0,
        }

    rows = [row("power_of_two", True, 20.0, 0.4), row("least_cost", True, 20.0, 0.2)]
    rows += [row("least_cost", True, 10.0, 0.1), row("least_cost", False, 20.0, 0.3)]
    result = {
        "params": asdict(prefix_routing.Params(rates=(10.0, 20.0))),
        "profile_source": "x",
        "num_conversations": 2,
        "num_turns": 10,
        "num_follow_up_turns": 8,
        "mean_prompt_tokens": 100.0,
        "mean_output_tokens": 50.0,
        "best_rule": prefix_routing.best_rule(rows, 20.0),
        "rows": rows,
    }
    assert result["best_rule"] == "least_cost"
    (target,) = prefix_routing.targets(result)
    assert target["value"] == pytest.approx(2.0) and target["met"] is True
    assert "| least_cost | off | 20 | 0.300 |" in prefix_routing.render(result)


def test_expected_remaining_compares_orders_on_the_same_requests(tmp_path) -> None:
    """A few simulated requests from a hand-made calibration file: every order runs on every (rate, seed),
    the comparisons pair seeds, and the section renders."""
    from bench.experiments import expected_remaining

    rows = [
        {
            "id": str(i),
            "prompt_tokens": 20 + i,
            "output_tokens": 10 + 7 * i % 50,
            "predicted_tokens": 10 + 3 * i % 40,
        }
        | {"group": i, "fold": i % 2}
        for i in range(30)
    ]
    levels = [{"level": q, "share_below": q, "share_at_or_below": q} for q in (0.1, 0.5, 0.9)]
    calibration = {
        "max_output_tokens": 64,
        "num_folds": 2,
        "calibration": {
            "num_prompts": 30,
            "num_groups": 30,
            "num_bands": 2,
            "levels": levels,
            "point_prediction": {"share_below": 0.4, "share_at_or_below": 0.45},
            "share_at_cap": 0.0,
        },
        "rows": rows,
        "meta": {"command": "made by hand"},
    }
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(calibration))
    params = expected_remaining.Params(
        calibration=str(path),
        profile=str(expected_remaining.harness.REPO_DIR / "profiles" / "cpu-tiny-llama.json"),
        num_replicas=2,
        num_requests=24,
        rates=(4.0,),
        seeds=(0, 1),
        max_num_seqs=4,
    )
    result = expected_remaining.run(params)
    assert len(result["rows"]) == len(expected_remaining.ORDERS) * 2
    ours = next(c for c in result["comparisons"] if c["order"] == "expected_remaining")
    assert set(ours) >= {
        "mean_jct_s_vs_fcfs",
        "mean_jct_s_vs_point_ssjf_bounded",
        "p99_jct_s_vs_point_ssjf_bounded",
    }
    baseline = next(
        c for c in result["comparisons"] if c["ranks_by"] == "point" and c["order"] == "ssjf_bounded"
    )
    assert "mean_jct_s_vs_point_ssjf_bounded" not in baseline
    (target,) = expected_remaining.targets(result)
    assert target["value"] == pytest.approx(-ours["mean_jct_s_vs_point_ssjf_bounded"]["mean"])
    assert len(expected_remaining.oracle_shares(result)) == 1
    assert all(r["num_preemptions"] == 0 for r in result["rows"])  # 100,000 blocks: KV never runs short
    text = expected_remaining.render(result)
    assert "| p50 | 0.50 | 0.50 |" in text and "| 4 | expected_remaining | distribution |" in text
