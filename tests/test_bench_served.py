"""``binserve bench served``'s bookkeeping: every request and token counted, medians over the pairs, the
targets judged per model. No timing is asserted: the figures are the benchmark's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import served
from bench.served import EngineRun, Pair, ServedRun, summarize, targets


def _pair(num_streams: int, engine_tokens_per_s: float, served_tokens_per_s: float, gap_s: float) -> Pair:
    engine = EngineRun(
        num_requests=num_streams,
        num_tokens=128 * num_streams,
        tokens_per_s=engine_tokens_per_s,
        p50_step_s=0.010,
    )
    run = ServedRun("grpc", num_streams, 128 * num_streams, 32 * num_streams, served_tokens_per_s, gap_s, 0.1)
    return Pair(num_streams, True, engine, [run], 1.0)


def test_a_level_is_the_median_over_its_pairs_and_the_ratio_the_median_of_the_pairs_ratios() -> None:
    pairs = [
        _pair(32, 1000.0, 900.0, 0.010),
        _pair(32, 2000.0, 1000.0, 0.012),
        _pair(32, 1000.0, 500.0, 0.030),
    ]
    [level] = summarize(pairs)
    assert (level["num_streams"], level["api"], level["num_pairs"]) == (32, "grpc", 3)
    assert level["engine_tokens_per_s"] == 1000.0 and level["served_tokens_per_s"] == 900.0
    assert level["served_over_engine"] == 0.5  # ratios 0.9, 0.5, 0.5
    assert level["served_over_engine_range"] == [0.5, 0.9]
    assert level["tokens_per_chunk"] == 4.0
    assert level["gap_over_step"] == pytest.approx(1.2)


def test_the_ratio_target_is_the_models_at_its_stream_counts_and_the_gap_target_everywhere() -> None:
    levels = summarize([_pair(8, 1000.0, 500.0, 0.010), _pair(32, 1000.0, 850.0, 0.012)])
    tiny = targets("tiny-llama", levels)
    assert [t["met"] for t in tiny] == [
        True,
        True,
        False,
    ]  # gap at 8; ratio 0.85 >= 0.8 at 32; gap 1.2x at 32
    assert "0.8x the engine alone at 32 streams" in tiny[1]["target"]
    smollm2 = targets("smollm2-135m-instruct", levels)
    assert [(t["threshold"], t["met"]) for t in smollm2] == [
        (0.95, False),
        (1.1, True),
        (0.95, False),
        (1.1, False),
    ]
    assert [t["threshold"] for t in targets("another-model", levels)] == [1.1, 1.1]


def test_a_smoke_run_counts_every_request_and_token_of_both_apis_and_renders(
    tiny_llama: str, tmp_path: Path
) -> None:
    from tools.cli import main

    out = tmp_path / "served.json"
    assert main(["bench", "served", "--model", tiny_llama, "--smoke", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["max_tokens"], result["num_rounds"]) == (8, 1)
    [pair] = result["pairs"]
    assert pair["num_streams"] == 2 and pair["is_engine_first"]
    assert (pair["engine"]["num_requests"], pair["engine"]["num_tokens"]) == (2, 16)
    assert [s["api"] for s in pair["served"]] == ["grpc", "http"]
    for run in pair["served"]:
        assert (run["num_requests"], run["num_tokens"]) == (2, 16)
        assert 2 <= run["num_chunks"] <= 16  # a chunk carries one token or several, never none
    assert [(lv["num_streams"], lv["api"]) for lv in result["levels"]] == [(2, "grpc"), (2, "http")]
    assert [t["threshold"] for t in result["targets"]] == [
        1.1
    ]  # the tiny fixture's directory has no ratio target
    text = served.render(result)
    assert "| 2 | grpc |" in text and "| 2 | http |" in text


def test_the_demo_pairs_read_the_demos_summary_line_and_render_every_run() -> None:
    from bench import demo_pairs

    line = "\n24 requests in 31.4 s: 102 output tokens/s, 0.76 requests/s\nTTFT p50 ..."
    assert demo_pairs.SUMMARY.search(line).groups() == ("24", "31.4", "102")
    runs = [
        {
            "label": label,
            "commit": commit,
            "date_utc": "2026-12-06 21:00",
            "load_average": {"start": 1.0, "end": 2.0},
            "returncode": 0,
            "num_requests": 24,
            "wall_s": 30.0,
            "output_tokens_per_s": tokens_per_s,
        }
        for label, commit, tokens_per_s in (("before", "d14c46d", 90.0), ("after", "5aca7bd", 110.0))
    ]
    meta = {"machine": {"cpu": "cpu", "num_cores": 2, "platform": "linux"}, "date": "d", "command": "c"}
    text = demo_pairs.render(
        {"runs": runs, "median_output_tokens_per_s": {"before": 90.0, "after": 110.0}, "meta": meta}
    )
    assert "| before | d14c46d |" in text and "| after | 5aca7bd |" in text
    assert "Medians: before 90, after 110." in text


def test_the_neighbour_ratios_are_per_pair_against_that_pair_s_idle_run() -> None:
    """``binserve bench neighbour``: each busy run over its own pair's idle run; the median per neighbour."""
    from bench.neighbour import NEIGHBOURS, ratios

    busy, churn = NEIGHBOURS
    runs = [
        {"num_streams": 8, "pair": 0, "neighbour": None, "tokens_per_s": 100.0},
        {"num_streams": 8, "pair": 0, "neighbour": busy, "tokens_per_s": 90.0},
        {"num_streams": 8, "pair": 0, "neighbour": churn, "tokens_per_s": 80.0},
        {"num_streams": 8, "pair": 1, "neighbour": busy, "tokens_per_s": 50.0},
        {"num_streams": 8, "pair": 1, "neighbour": churn, "tokens_per_s": 50.0},
        {"num_streams": 8, "pair": 1, "neighbour": None, "tokens_per_s": 50.0},
    ]
    rows = {r["neighbour"]: r for r in ratios(runs)}
    assert rows[busy]["ratios"] == [0.9, 1.0] and rows[busy]["median_ratio"] == pytest.approx(0.95)
    assert rows[churn]["ratios"] == [0.8, 1.0] and rows[churn]["idle_tokens_per_s"] == 75.0


def test_model_process_pools_every_pair_of_a_setting_and_counts_each_pairs_worse_api(tmp_path: Path) -> None:
    from dataclasses import asdict

    from bench import model_process

    def run(name: str, apart: bool, pairs: list[Pair], model: str = "smollm2-135m-instruct") -> str:
        path = tmp_path / f"{name}.json"
        meta = {"date": "2026-12-08T00:00:00+00:00", "command": "binserve bench served", "load_average": None}
        result = {
            "model": model,
            "separate_model_process": apart,
            "pairs": [asdict(p) for p in pairs],
            "meta": meta,
        }
        path.write_text(json.dumps(result))
        return str(path)

    slow_http = _pair(8, 1000.0, 900.0, 0.011)
    slow_http.served.append(ServedRun("http", 8, 1024, 256, 700.0, 0.015, 0.1))  # the worse API of its pair
    runs = [
        run("in-1", False, [slow_http, _pair(32, 1000.0, 800.0, 0.012)]),
        run("apart-1", True, [_pair(8, 1000.0, 950.0, 0.010)]),
        run("apart-2", True, [_pair(8, 2000.0, 1000.0, 0.020), _pair(8, 1000.0, 990.0, 0.011)]),
    ]
    result = model_process.combine(runs)
    rows = {(r["separate_model_process"], r["num_streams"]): r for r in result["rows"]}
    assert list(rows) == [(False, 8), (False, 32), (True, 8)]
    assert rows[False, 8]["served_over_engine"] == 0.7 and rows[False, 8]["gap_over_step"] == pytest.approx(
        1.5
    )
    apart = rows[True, 8]
    assert apart["num_pairs"] == 3 and apart["served_over_engine"] == 0.95  # ratios 0.95, 0.5, 0.99
    assert apart["served_over_engine_range"] == [0.5, 0.99]
    assert "in a stage actor of its own | 8" in model_process.render({**result, "meta": _meta()})
    with pytest.raises(ValueError, match="runs: one model at a time"):
        model_process.combine([*runs, run("tiny", True, [_pair(8, 1.0, 1.0, 0.01)], model="tiny-llama")])
    legacy = tmp_path / "legacy.json"
    legacy.write_text(json.dumps({"model": "m", "pairs": [], "meta": {}}))
    with pytest.raises(ValueError, match="without separate_model_process"):
        model_process.combine([str(legacy)])


def _meta() -> dict:
    machine = {"cpu": "cpu", "num_cores": 2, "platform": "linux"}
    return {"machine": machine, "date": "d", "command": "c", "duration_s": 0.0, "load_average": {}}
