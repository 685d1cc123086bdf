"""Bins cut from the predictor's own predictions (tools/predictor/bins.py): what the shipped predictors
store is what the command computes, each bin takes its share of the workload's prompts, and a predictor saved
without them still cuts from its training lengths."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from cluster.predictor import LengthPredictor, predictor_dir


@pytest.fixture(scope="module")
def workload() -> list[str]:
    from tools.predictor.bins import workload_prompts

    return workload_prompts()


@pytest.fixture(scope="module")
def predicted(workload: list[str]) -> list[int]:
    from tools.predictor.bins import served_predictions

    return served_predictions(predictor_dir("fast"), workload)


def test_the_shipped_fast_predictor_stores_the_quantiles_of_its_predictions(predicted: list[int]) -> None:
    from tools.predictor.bins import prediction_quantiles

    assert LengthPredictor.load("fast").metadata.prediction_quantiles == prediction_quantiles(predicted)


@pytest.mark.parametrize("num_bins", [2, 4])
def test_each_bin_takes_its_share_of_the_workload(predicted: list[int], num_bins: int) -> None:
    from tools.predictor.bins import shares

    by_bin = shares(predicted, LengthPredictor.load("fast").bin_boundaries(num_bins))
    # Equal up to the predictions tied at an edge (integers), which bin_of puts in the lower bin.
    assert all(abs(share - 1 / num_bins) < 0.02 for share in by_bin), by_bin


def test_bins_fall_back_to_the_training_lengths_and_reject_unsorted_points() -> None:
    metadata = LengthPredictor.load("fast").metadata
    without = dataclasses.replace(metadata, prediction_quantiles=None)
    assert LengthPredictor(LengthPredictor.load("fast").model, without).bin_boundaries(2) == [
        int(metadata.length_quantiles[len(metadata.length_quantiles) // 2])
    ]
    with pytest.raises(ValueError, match="prediction_quantiles: need at least 2 points, ascending"):
        dataclasses.replace(metadata, prediction_quantiles=[3.0, 1.0])


def test_cut_bins_rewrites_only_the_metadata(tmp_path: Path) -> None:
    from tests.calls import run_predictor_cli

    directory = tmp_path / "fast"
    shutil.copytree(predictor_dir("fast"), directory)
    weights = (directory / "weights.safetensors").read_bytes()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"Write {n} words about the sea."}) + "\n" for n in range(50))
    )
    run_predictor_cli(
        "predictor", "cut-bins", "--predictor", str(directory), "--prompts", str(prompts), "--threads", "1"
    )
    points = LengthPredictor.load(directory).metadata.prediction_quantiles
    assert len(points) == 1001 and points != LengthPredictor.load("fast").metadata.prediction_quantiles
    assert (directory / "weights.safetensors").read_bytes() == weights


def test_cut_bins_rejects_bad_options_by_name(tmp_path: Path) -> None:
    from tests.calls import run_predictor_cli

    with pytest.raises(ValueError, match="predictor: no predictor.json in"):
        run_predictor_cli("predictor", "cut-bins", "--predictor", str(tmp_path))
    directory = tmp_path / "fast"
    shutil.copytree(predictor_dir("fast"), directory)
    with pytest.raises(ValueError, match="prompts: no such file"):
        run_predictor_cli(
            "predictor", "cut-bins", "--predictor", str(directory), "--prompts", str(tmp_path / "x")
        )
    with pytest.raises(ValueError, match="threads: must be at least 1, got 0"):
        run_predictor_cli("predictor", "cut-bins", "--predictor", str(directory), "--threads", "0")
    (tmp_path / "one.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(ValueError, match="prompts: need at least 2 prompts"):
        run_predictor_cli(
            "predictor", "cut-bins", "--predictor", str(directory), "--prompts", str(tmp_path / "one.jsonl")
        )


def test_the_bin_cut_simulation_runs_the_same_requests_every_way(smollm2: str) -> None:
    from bench.experiments import bin_cuts

    params = bin_cuts.Params(num_requests=24, rates=(0.2,), seeds=(0,), tokenizer=smollm2)
    result = bin_cuts.run(params)
    [row] = result["runs"]
    assert row["one pool"]["share_in_bin_0"] == 1.0 and result["edges"]["one pool"] == []
    assert result["edges"]["predictions"] == LengthPredictor.load().bin_boundaries(2)
    assert row["labels"]["share_in_bin_0"] >= row["predictions"]["share_in_bin_0"]
    assert "| 0.2 |" in bin_cuts.render(result)
