"""Acceptance tests of the SSJF proxy model (issue 6): train, evaluate, the default predictor, bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from bench.labels import LengthRecord, is_validation, read_records, split_records
from bench.workload import SHAREGPT_PACKAGE
from cluster.predictor import LengthPredictor, Prediction
from cluster.predictor.lengths import bin_of, equal_mass_boundaries, quantile_boundaries
from cluster.predictor.traffic_log import TrafficLog
from tests.calls import run_predictor_cli
from tools.predictor import cli as predictor_cli

# 1,000 ShareGPT records hold out about 110: enough for the trained-vs-median margins below to hold for
# any seed (with 600, held-out MAE swung by 30% between seeds), and a frozen-encoder run over them takes
# seconds on two CPU cores.
NUM_SLICE_RECORDS = 1000
REPORT_KEYS = {
    "mae_tokens",
    "spearman",
    "kendall_tau",
    "bucket_accuracy",
    "binary_accuracy",
    "num_held_out",
    "p50_latency_ms_batch1",
    "p50_latency_ms_batch16",
    "p50_latency_ms_per_request_batch16",
}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workers.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def trained_report(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict:
    """Train on a slice of the packaged ShareGPT pairs plus a small traffic log through the CLI, evaluate,
    return the JSON."""
    work = tmp_path_factory.mktemp("predictor")
    traffic = TrafficLog(work / "traffic.jsonl")
    traffic.append("Reply with one word: yes or no?", output_tokens=2)
    traffic.append("Write a long, detailed essay on the history of Rome.", output_tokens=900)
    data = ("--data", SHAREGPT_PACKAGE, "--data", work / "traffic.jsonl", "--tokenizer", tiny_model_dir)
    slice_args = ("--max-examples", NUM_SLICE_RECORDS)
    assert (
        run_predictor_cli(
            "train-predictor", *data, *slice_args, "--out", work / "out", "--epochs", 10, "--threads", 1
        )
        == 0
    )
    report_path = work / "eval.json"
    assert (
        run_predictor_cli(
            "eval-predictor",
            "--predictor",
            work / "out",
            *data,
            *slice_args,
            "--json",
            report_path,
            "--latency-calls",
            2,
            "--threads",
            1,
        )
        == 0
    )
    return json.loads(report_path.read_text())


def test_train_and_eval_write_the_report(trained_report: dict) -> None:
    assert trained_report.keys() >= REPORT_KEYS
    assert set(trained_report["baselines"]) == {"training_median", "prompt_length_linear"}
    for baseline in trained_report["baselines"].values():
        assert {
            "mae_tokens",
            "spearman",
            "kendall_tau",
            "bucket_accuracy",
            "binary_accuracy",
        } <= baseline.keys()
    assert trained_report["num_held_out"] >= 80
    assert len(trained_report["file_bucket_boundaries"]) == 4  # 5 equal-mass buckets of the held-out file


def test_trained_predictor_beats_the_median_baseline(trained_report: dict) -> None:
    median = trained_report["baselines"]["training_median"]
    # Seeds 0-2 on this slice reach 7-9% lower MAE, Spearman 0.39-0.41, bucket accuracy +0.09-0.16 and
    # binary accuracy +0.06-0.10 over the median baseline (0.25 bucket, 0.53 binary); the margins
    # asserted sit below that range and far above what an untrained head reaches.
    assert trained_report["mae_tokens"] < median["mae_tokens"]
    assert trained_report["spearman"] > 0.25
    assert trained_report["bucket_accuracy"] > median["bucket_accuracy"] + 0.05
    assert trained_report["binary_accuracy"] > median["binary_accuracy"]


def test_default_predictor_predicts_a_batch() -> None:
    predictor = LengthPredictor.load()
    prompts = [
        "hi",
        "Translate 'good morning' into French.",
        "Write a detailed, multi-section technical design document for a distributed key-value store.",
    ]
    prediction = predictor.predict(prompts)
    assert isinstance(prediction, Prediction)
    assert len(prediction.output_tokens) == len(prediction.bucket_ids) == len(prompts)
    assert all(n >= 1 for n in prediction.output_tokens)
    assert all(0 <= b < predictor.metadata.num_buckets for b in prediction.bucket_ids)
    # Batching must not change an answer beyond float noise: padding is masked out of attention and pooling.
    alone = [predictor.predict([p]).output_tokens[0] for p in prompts]
    assert alone == pytest.approx(prediction.output_tokens, rel=0.02, abs=1)
    assert predictor.predict([]) == Prediction(output_tokens=[], bucket_ids=[])


def test_default_predictor_bins() -> None:
    predictor = LengthPredictor.load()
    edges = predictor.bin_boundaries(4)
    assert len(edges) == 3 and edges == sorted(edges)
    assert predictor.bin_boundaries(1) == []
    assert bin_of(edges[0], edges) == 0 and bin_of(edges[0] + 1, edges) == 1 and bin_of(10**6, edges) == 3


def test_lengths_conventions() -> None:
    lengths = list(range(1, 101))
    assert equal_mass_boundaries(lengths, 4) == [25, 50, 75]
    assert quantile_boundaries(lengths, [0.5]) == [50]
    assert [bin_of(n, [25, 50, 75]) for n in (1, 25, 26, 75, 76)] == [0, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="num_bins"):
        equal_mass_boundaries(lengths, 0)


def test_split_is_by_id_and_stable() -> None:
    records = [LengthRecord(f"id-{i}", f"prompt {i}", i) for i in range(1000)]
    train, held_out = split_records(records, 0.1)
    assert len(train) + len(held_out) == 1000 and 60 < len(held_out) < 140
    assert all(is_validation(r.record_id, 0.1) for r in held_out)
    # A prefix's split is the prefix of the whole file's split: --max-examples never leaks.
    _, prefix_held_out = split_records(records[:300], 0.1)
    assert prefix_held_out == [r for r in held_out if int(r.record_id[3:]) < 300]


def test_traffic_log_round_trip(tmp_path: Path) -> None:
    log = TrafficLog(tmp_path / "logs" / "traffic.jsonl")
    log.append("What is 2+2?", output_tokens=3)
    log.append("Explain transformers.", output_tokens=412)
    records = read_records(log.path)
    assert [(r.prompt, r.output_tokens) for r in records] == [
        ("What is 2+2?", 3),
        ("Explain transformers.", 412),
    ]
    with pytest.raises(ValueError, match="prompt"):
        log.append("  ", output_tokens=3)
    with pytest.raises(ValueError, match="output_tokens"):
        log.append("ok", output_tokens=-1)


def test_responses_are_counted_with_the_served_tokenizer(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    response = "Paged attention splits the KV cache into fixed-size blocks."
    path = tmp_path / "pairs.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"id": "a", "prompt": "What is paged attention?", "response": response}) + "\n")
    (record,) = read_records(path, tiny_model_dir)
    expected = len(
        AutoTokenizer.from_pretrained(tiny_model_dir)(response, add_special_tokens=False)["input_ids"]
    )
    assert record.output_tokens == expected
    with pytest.raises(ValueError, match="tokenizer"):
        read_records(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", r"empty\.jsonl: no records"),
        ('{"prompt": "a", "output_tokens": 1}\n{"prompt": "b", \n', r"empty\.jsonl:2: not valid JSON"),
        ('{"output_tokens": 4}\n', r":1: missing field 'prompt'"),
        ('{"prompt": "", "output_tokens": 4}\n', r":1: field 'prompt' must be a non-empty string"),
        ('{"prompt": "hi"}\n', r":1: missing field 'output_tokens'"),
        ('{"prompt": "hi", "output_tokens": "many"}\n', r":1: field 'output_tokens' must be an integer"),
        ('["prompt", "hi"]\n', r":1: expected a JSON object"),
    ],
)
def test_bad_data_files_name_the_file_line_and_field(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_records(path)


def test_missing_data_file_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        read_records(tmp_path / "absent.jsonl")


def test_empty_prompt_at_predict_time_names_the_field() -> None:
    predictor = LengthPredictor.load()
    with pytest.raises(ValueError, match=r"prompt: prompts\[1\]"):
        predictor.predict(["fine", ""])


def test_bad_training_options_are_value_errors(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "traffic.jsonl"
    data.write_text('{"prompt": "hi", "output_tokens": 1}\n')
    common = ("--data", data, "--tokenizer", tiny_model_dir, "--out", tmp_path / "out")
    with pytest.raises(ValueError, match="finetune_layers"):
        run_predictor_cli("train-predictor", *common, "--finetune-layers", 5)
    with pytest.raises(ValueError, match="training records"):
        run_predictor_cli("train-predictor", *common)


def test_binserve_cli_registers_the_predictor_commands() -> None:
    from tools.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["eval-predictor", "--data", "x.jsonl", "--tokenizer", "m"])
    assert args.func is predictor_cli.run_eval


def test_in_process_predictor_batches_what_arrives_while_it_encodes() -> None:
    """The ingress's own predictor: the prompts waiting when the encoder is free form its next batch (up
    to max_batch_size; no waiting window); each caller gets its own prompt's prediction, as a direct
    call gives it."""
    import asyncio

    from cluster.config import PredictorConfig
    from cluster.predictor_client import InProcessPredictor

    predictor = InProcessPredictor(PredictorConfig(max_batch_size=3))
    batches = []
    encode = predictor.predictor.predict

    def recording(prompts):
        batches.append(len(prompts))
        return encode(prompts)

    predictor.predictor.predict = recording
    prompts = ["hi", "Write an essay about the sea.", "2+2?", "List ten fruits.", "Explain paged attention."]

    async def run() -> list[int]:
        return list(await asyncio.gather(*(predictor.predict(p) for p in prompts)))

    assert asyncio.run(run()) == [int(n) for n in encode(prompts).output_tokens]
    assert batches == [1, 3, 1]  # the first starts alone at once; the rest arrived while it was encoded
    assert asyncio.run(predictor.bin_boundaries(2)) == [int(b) for b in predictor.predictor.bin_boundaries(2)]


def test_predict_starts_the_encoder_before_the_caller_awaits_and_answers_repeats_from_the_cache() -> None:
    """``predict`` hands the prompt to the encoder thread at once (the ingress tokenizes meanwhile); a
    prompt answered before is answered again without the encoder; cache_size 0 keeps nothing."""
    import asyncio
    import threading

    from cluster.config import PredictorConfig
    from cluster.predictor_client import InProcessPredictor

    for cache_size, expected_calls in ((8, 1), (0, 2)):
        predictor = InProcessPredictor(PredictorConfig(cache_size=cache_size))
        encode, started, calls = predictor.predictor.predict, threading.Event(), []

        def recording(prompts, encode=encode, started=started, calls=calls):
            calls.append(list(prompts))
            started.set()
            return encode(prompts)

        predictor.predictor.predict = recording

        async def run(predictor=predictor, started=started) -> tuple[int, int, bool]:
            first = predictor.predict("Explain paged attention.")
            assert started.wait(timeout=60)  # the loop has not run: the encoder started on its own
            tokens = await first
            again = predictor.predict("Explain paged attention.")
            return tokens, await again, again.done()

        tokens, repeated, _ = asyncio.run(run())
        assert repeated == tokens == int(encode(["Explain paged attention."]).output_tokens[0])
        assert len(calls) == expected_calls


def test_prediction_cache_keeps_the_most_recent_prompts() -> None:
    from cluster.predictor_client import PredictionCache

    cache = PredictionCache(max_size=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)
    empty = PredictionCache(max_size=0)
    empty.put("a", 1)
    assert empty.get("a") is None


def test_the_inference_layers_give_transformers_floats() -> None:
    """The encoder's written-out inference layers compute what transformers' BertLayer computes, padded
    batch included."""
    import torch

    predictor = LengthPredictor.load()
    encoder = predictor.model.encoder
    tokenized = encoder.tokenize(["hi", "Write a detailed design document for a key-value store, please."])
    input_ids, attention_mask = encoder.pad(tokenized.token_ids)
    with torch.inference_mode():
        hidden = encoder.embed(input_ids)
        ours = encoder._run_layers_inference(hidden, attention_mask, 0, len(encoder.layers))
        theirs = encoder._run_layers_transformers(hidden, attention_mask, 0, len(encoder.layers))
    real = attention_mask.bool()
    assert torch.allclose(ours[real], theirs[real], atol=1e-5)


def test_int8_and_fewer_prompt_tokens_run_the_same_predictor_differently() -> None:
    predictor = LengthPredictor.load(encoder_precision="int8", max_prompt_tokens=16)
    assert predictor.is_int8 and not LengthPredictor.load().is_int8
    assert all(len(ids) <= 16 for ids in predictor.model.encoder.tokenize(["word " * 100]).token_ids)
    prompts = ["hi", "Translate 'good morning' into French.", "Write a detailed essay about the sea. " * 20]
    # int8 quantizes each call's activations as a whole, so it encodes prompts one at a time: a prompt's
    # answer does not depend on its batch.
    assert [predictor.predict([p]).output_tokens[0] for p in prompts] == predictor.predict(
        prompts
    ).output_tokens


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (dict(encoder_precision="int4"), r"encoder_precision: must be one of"),
        (dict(max_prompt_tokens=4), r"max_prompt_tokens: must be null .* \[8, 512\], got 4"),
        (dict(max_prompt_tokens=513), r"max_prompt_tokens: .* got 513"),
        (dict(torch_threads=0), r"torch_threads"),
        (dict(cache_size=-1), r"cache_size"),
    ],
)
def test_bad_predictor_run_options_name_the_field(fields: dict, match: str) -> None:
    from cluster.config import PredictorConfig

    with pytest.raises(ValueError, match=match):
        PredictorConfig(**fields)
