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
        (["--temperature", "-1"], "temperature: must be in [0.0, 2.0], got -1.0"),
        (["--top-p", "0"], "top_p: must be in (0, 1], got 0.0"),
    ],
)
def test_bad_flags_are_usage_errors(tiny_llama: str, capsys, extra: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", tiny_llama, "--prompt", "hi", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_generate_on_the_default_model_needs_only_the_model(smollm2: str, capsys, caplog) -> None:
    """SmolLM2's 8,192-token context does not fit the CPU's default KV pool: max_model_len is capped to what
    fits, with a note, instead of failing; unset sampling fields take the model's generation_config.json."""
    assert main(["generate", "--model", smollm2, "--prompt", "What is the capital of France?", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["num_output_tokens"] >= 1
    assert "max_model_len: 5824 tokens, what the KV cache holds (the model allows 8192" in caplog.text


def test_generate_chat_renders_the_template_and_answers(smollm2: str, capsys) -> None:
    argv = ["generate", "--model", smollm2, "--prompt", "What is the capital of France?", "--chat"]
    assert main([*argv, "--temperature", "0", "--max-tokens", "12", "--json"]) == 0
    assert "Paris" in json.loads(capsys.readouterr().out)["text"]


def test_the_python_api_and_the_cli_default_to_the_models_sampling(smollm2: str, capsys) -> None:
    llm = LLM(EngineConfig(ModelConfig(smollm2, max_model_len=2048)))
    assert llm.default_sampling_params() == SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.1)
    assert llm.default_sampling_params(temperature=0.0).temperature == 0.0
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "the model's generation_config.json" in capsys.readouterr().out


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
