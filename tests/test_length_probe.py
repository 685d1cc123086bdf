"""The length probe: its arithmetic, its file, and the engine refining a request's length with it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import CacheConfig, EngineConfig, ModelConfig
from pipeline.plan import ScheduledChunk
from pipeline.request import NewRequest, SamplingParams
from tools.predictor.probe import (
    RIDGE_STRENGTHS,
    ProbeRecord,
    examples,
    held_out_report,
    predict_ridge,
    train_probe,
)
from workers.length_probe import FeatureRecorder, LengthProbe, ProbeMetadata

HIDDEN = 8


def constant_probe(
    remaining: int, hidden_size: int = HIDDEN, start: int = 4, interval: int = 4
) -> LengthProbe:
    """Predicts ``remaining`` more tokens whatever the state (weights 0, bias log1p(remaining))."""
    return LengthProbe(
        torch.zeros(hidden_size + 1),
        math.log1p(remaining),
        torch.zeros(hidden_size),
        torch.ones(hidden_size),
        ProbeMetadata(hidden_size=hidden_size, model="test", start=start, interval=interval),
    )


def chunk(output_index: int, max_tokens: int = 100, request_id: str = "r") -> ScheduledChunk:
    return ScheduledChunk(
        request_id, (1,), 10 + output_index, (0,), SamplingParams(max_tokens=max_tokens), output_index
    )


def test_probe_refines_due_rows_only_and_caps_at_max_tokens() -> None:
    probe = constant_probe(remaining=7)
    chunks = [chunk(0), chunk(3), chunk(4), chunk(8), chunk(12, max_tokens=15), chunk(9)]
    assert probe(chunks, torch.randn(len(chunks), HIDDEN)) == (None, None, 11, 15, 15, None)


def test_probe_round_trips_and_refuses_another_hidden_size(tmp_path: Path) -> None:
    probe = LengthProbe(
        torch.randn(HIDDEN + 1),
        0.5,
        torch.randn(HIDDEN),
        torch.rand(HIDDEN) + 0.5,
        ProbeMetadata(hidden_size=HIDDEN, model="m"),
    )
    probe.save(tmp_path / "p")
    loaded = LengthProbe.load(tmp_path / "p", hidden_size=HIDDEN)
    hidden, at = torch.randn(5, HIDDEN), torch.tensor([16, 32, 48, 64, 80])
    assert torch.allclose(loaded.predict_remaining(hidden, at), probe.predict_remaining(hidden, at))
    with pytest.raises(
        ValueError, match=r"reads hidden states of size 8 \(model m\), the served model's are 9"
    ):
        LengthProbe.load(tmp_path / "p", hidden_size=9)
    with pytest.raises(ValueError, match="length_probe: .* has no probe.safetensors"):
        LengthProbe.load(tmp_path / "missing")


def test_feature_recorder_keeps_states_at_its_positions() -> None:
    recorder = FeatureRecorder(positions=(0, 4))
    chunks = [chunk(0, request_id="a"), chunk(2, request_id="b"), chunk(4, request_id="b")]
    hidden = torch.arange(3 * HIDDEN, dtype=torch.float32).reshape(3, HIDDEN)
    assert recorder(chunks, hidden) == (None, None, None)
    states = recorder.pop("b")
    assert (
        list(states) == [4] and states[4].dtype == torch.float16 and torch.equal(states[4].float(), hidden[2])
    )
    assert recorder.pop("b") == {} and list(recorder.pop("a")) == [0]


def test_ridge_probe_learns_a_planted_signal() -> None:
    """Remaining tokens written into one hidden coordinate: the fitted probe ranks held-out prompts by it."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(300):
        total = int(rng.integers(40, 500))
        states = {}
        for position in (0, 16, 32):
            state = rng.normal(size=HIDDEN).astype(np.float32)
            state[3] = np.log1p(total - position)
            states[position] = state
        records.append(ProbeRecord(f"p{i}", total, states))
    model, strength = train_probe(records[:200])
    assert strength in RIDGE_STRENGTHS
    report = held_out_report(model, records[200:])
    assert set(report) == {"0", "16", "32"} and all(r["spearman"] > 0.95 for r in report.values())
    hidden, at, remaining, _ = examples(records[200:], (32,))
    assert np.median(np.abs(predict_ridge(model, hidden, at) - remaining) / remaining) < 0.1


def test_engine_applies_the_probes_refinement(tiny_llama: str) -> None:
    """The runner calls the probe on the last stage; the scheduler takes its guess as the request's."""
    from workers.llm import LLM
    from workers.runner import ModelRunner

    config = EngineConfig(ModelConfig(tiny_llama, max_model_len=512), CacheConfig(num_blocks=64))
    runner = ModelRunner(config.model, config.cache)
    runner.length_probe = constant_probe(remaining=5, hidden_size=runner.hf_config.hidden_size)
    engine = LLM(config, runner).engine
    request = engine.add_request(
        NewRequest(
            "a", (1, 2, 3), SamplingParams(max_tokens=30, ignore_eos=True), predicted_output_tokens=200
        )
    )
    seen = []
    while engine.has_unfinished:
        engine.step()
        seen.append((request.num_output_tokens, request.refined_output_tokens))
    # Refined at output 4 (to 4 + 5), 8, ...: the prompt-only guess of 200 is replaced from then on.
    assert seen[3] == (4, None) and seen[4] == (5, 9) and seen[8] == (9, 13)
    assert request.predicted_remaining_tokens >= 0
