"""The command line: generate's JSON, and bad input as a usage error naming the field."""

from __future__ import annotations

import json

import pytest

from pipeline.config import EngineConfig, ModelConfig
from pipeline.request import SamplingParams
from tools.cli import main
from workers.llm import LLM


def test_generate_json_matches_the_engine(tiny_llama: str, capsys: pytest.CaptureFixture) -> None:
    argv = [
        "generate",
        "--model",
        tiny_llama,
        "--prompt",
        "Hello there",
        "--max-tokens",
        "7",
        "--chunk-size",
        "4",
    ]
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    [expected] = LLM(EngineConfig(ModelConfig(tiny_llama))).generate(
        ["Hello there"], SamplingParams(max_tokens=7)
    )
    assert result["token_ids"] == list(expected.completion.output_token_ids)
    assert result["text"] == expected.text
    assert result["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-tokens", "0"], "max_tokens: must be in [1, inf], got 0"),
        (["--temperature", "-1"], "temperature: must be in [0.0, inf], got -1.0"),
        (["--top-p", "0"], "top_p: must be in (0, 1], got 0.0"),
    ],
)
def test_bad_flags_are_usage_errors(tiny_llama: str, capsys, extra: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", tiny_llama, "--prompt", "hi", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_model_directory_is_a_usage_error(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"])
    assert exit_info.value.code == 2
    assert "model: directory" in capsys.readouterr().err


def test_make_tiny_model_is_seeded(tmp_path) -> None:
    assert main(["make-tiny-model", str(tmp_path / "a"), "--seed", "3"]) == 0
    assert main(["make-tiny-model", str(tmp_path / "b"), "--seed", "3"]) == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()


def test_profile_fits_a_cost_model_and_says_when(tiny_llama: str, tmp_path, capsys) -> None:
    from bench.sim.cost_model import StepCostModel

    out = tmp_path / "profile.json"
    assert (
        main(
            [
                "profile",
                "--model",
                tiny_llama,
                "--num-requests",
                "4",
                "--max-model-len",
                "512",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    model = StepCostModel.load(out)
    assert model.base_s >= 0 and "measured" in model.source and "load average" in model.source
