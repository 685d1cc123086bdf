"""Chat: rendering equals transformers', the shared intake's checks and serving defaults, without Ray.

The render checks use SmolLM2's real tokenizer and chat template (``smollm2`` in conftest.py: the
tokenizer only is read). The served checks are in tests/test_cluster.py (gRPC) and
tests/test_openai_api.py (HTTP), on a copy of the tiny model given the ChatML template below.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cluster.config import IngressConfig, SamplingDefaultsConfig
from cluster.intake import GenerationInput, Intake, SamplingDefaults
from pipeline.chat import ChatMessage, predictor_text, render_chat
from pipeline.request import SamplingParams

# SmolLM2's own template without its default system prompt: the tiny test model's.
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_chat_model(model_dir: str | Path, out_dir: Path) -> str:
    """A copy of a checkpoint whose tokenizer has the ChatML template (the tiny model has none)."""
    shutil.copytree(model_dir, out_dir)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHATML
    config_path.write_text(json.dumps(config))
    return str(out_dir)


CONVERSATIONS = {
    "one user turn": [("user", "What is the capital of France?")],
    "system and user": [("system", "Answer in one word."), ("user", "Capital of France?")],
    "multi-turn": [
        ("user", "Hi! Can you help me with Python?"),
        ("assistant", "Of course. What do you need?"),
        ("user", "How do I reverse a list?"),
    ],
    "multi-turn with system": [
        ("system", "You are terse."),
        ("user", "Name a prime."),
        ("assistant", "7"),
        ("user", "Another, with unicode: ünïcödé 🙂"),
    ],
}


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2: str):
    from workers.checkpoint import load_tokenizer

    return load_tokenizer(smollm2)


@pytest.fixture(scope="module")
def intake(smollm2: str, smollm2_tokenizer) -> Intake:
    limits = IngressConfig(max_output_tokens=512, max_messages=4, max_prompt_chars=2000)
    defaults = SamplingDefaults.resolve(smollm2, SamplingDefaultsConfig())
    return Intake(smollm2_tokenizer, limits, defaults, max_model_len=256)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_rendering_and_tokens_equal_transformers_apply_chat_template(smollm2_tokenizer, intake, name) -> None:
    messages = [ChatMessage(role, content) for role, content in CONVERSATIONS[name]]
    as_dicts = [{"role": m.role, "content": m.content} for m in messages]
    expected_text = smollm2_tokenizer.apply_chat_template(
        as_dicts, add_generation_prompt=True, tokenize=False
    )
    expected_ids = smollm2_tokenizer.apply_chat_template(as_dicts, add_generation_prompt=True, tokenize=True)
    if not isinstance(expected_ids, list):  # transformers 5 returns a BatchEncoding
        expected_ids = expected_ids["input_ids"]
    assert render_chat(smollm2_tokenizer, messages) == expected_text
    assert expected_text.endswith("<|im_start|>assistant\n")
    if messages[0].role != "system":  # SmolLM2's template adds its default system prompt
        assert expected_text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    prepared = intake.prepare(GenerationInput(messages=tuple(messages), max_tokens=8))
    assert list(prepared.prompt_token_ids) == list(expected_ids)


def test_the_predictor_sees_the_last_user_message() -> None:
    messages = [ChatMessage(r, c) for r, c in CONVERSATIONS["multi-turn with system"]]
    assert predictor_text(messages) == "Another, with unicode: ünïcödé 🙂"
    assert predictor_text([ChatMessage("system", "Be brief.")]) == "Be brief."


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        (dict(prompt="hi", messages=(ChatMessage("user", "hi"),)), r"prompt, messages: .* got both"),
        (dict(), r"prompt, messages: exactly one of them must be given, got neither"),
        (dict(messages=()), r"messages: must hold 1 to 4 messages, got 0"),
        (dict(messages=(ChatMessage("user", "hi"),) * 5), r"messages: must hold 1 to 4 messages, got 5"),
        (
            dict(messages=(ChatMessage("user", "hi"), ChatMessage("tool", "x"))),
            r"messages\[1\].role: must be one of system, user, assistant, got 'tool'",
        ),
        (dict(messages=(ChatMessage("user", ""),)), r"messages\[0\].content: must be a non-empty string"),
        (
            dict(messages=(ChatMessage("user", "word " * 500),)),
            r"messages: at most 2000 characters of content in all, got 2500",
        ),
        (
            dict(messages=(ChatMessage("user", "word " * 250),)),
            r"messages: the rendered prompt is \d+ tokens, must be at most 255 \(max_model_len 256",
        ),
        (dict(prompt="x" * 2001), r"prompt: at most 2000 characters, got 2001"),
        (dict(prompt="hi", max_tokens=0), r"max_tokens: must be in \[1, 512\], got 0"),
        (dict(prompt="hi", temperature=-1.0), r"temperature: must be in \[0.0, 2.0\], got -1.0"),
        (dict(prompt="hi", top_p=5.0), r"top_p: must be in \(0, 1\], got 5.0"),
        (dict(prompt="hi", repetition_penalty=0.0), r"repetition_penalty: must be in \(0, 2\], got 0.0"),
        (dict(prompt="hi", presence_penalty=2.5), r"presence_penalty: must be in \[-2.0, 2.0\], got 2.5"),
        (dict(prompt="hi", frequency_penalty=float("nan")), r"frequency_penalty: must be a finite number"),
        (dict(prompt="hi", stop=("a",) * 17), r"stop: at most 16 strings, got 17"),
        (dict(prompt="hi", stop=("x" * 257,)), r"stop\[0\]: at most 256 characters, got 257"),
    ],
)
def test_bad_input_names_the_field_and_the_limit(intake: Intake, request_fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        intake.prepare(GenerationInput(**request_fields))


def test_the_models_serving_defaults_apply_when_a_field_is_unset(intake: Intake) -> None:
    # SmolLM2's generation_config.json, written by workers/gguf.py: temperature 0.7, top_p 0.9, penalty 1.1.
    params = intake.prepare(GenerationInput(prompt="Hello")).params
    assert (params.temperature, params.top_p, params.repetition_penalty) == (0.7, 0.9, 1.1)
    assert (params.top_k, params.presence_penalty, params.frequency_penalty) == (0, 0.0, 0.0)
    # Unset max_tokens: whatever room the context leaves, capped by the ingress's max_output_tokens.
    num_prompt_tokens = len(intake.prepare(GenerationInput(prompt="Hello")).prompt_token_ids)
    assert params.max_tokens == min(512, 256 - num_prompt_tokens)
    # A request overrides per field; the rest keep the defaults.
    params = intake.prepare(GenerationInput(prompt="Hello", temperature=0.0, max_tokens=5)).params
    assert (params.temperature, params.top_p, params.repetition_penalty, params.max_tokens) == (
        0.0,
        0.9,
        1.1,
        5,
    )


def test_the_deployments_yaml_overrides_the_models_defaults(smollm2: str, tiny_llama: str) -> None:
    yaml_defaults = SamplingDefaultsConfig(temperature=0.2, repetition_penalty=1.0, max_tokens=64)
    resolved = SamplingDefaults.resolve(smollm2, yaml_defaults)
    assert resolved == SamplingDefaults(max_tokens=64, temperature=0.2, top_p=0.9, repetition_penalty=1.0)
    # No generation_config.json (the tiny model): greedy, no penalty.
    assert SamplingDefaults.resolve(tiny_llama, SamplingDefaultsConfig()) == SamplingDefaults()


def test_a_plain_prompt_is_tokenized_as_before(intake: Intake, smollm2_tokenizer) -> None:
    prepared = intake.prepare(GenerationInput(prompt="Hello there", temperature=0.0, max_tokens=4))
    assert list(prepared.prompt_token_ids) == smollm2_tokenizer("Hello there").input_ids
    assert prepared.params == SamplingParams(max_tokens=4, temperature=0.0, top_p=0.9, repetition_penalty=1.1)
    assert prepared.predictor_text == "Hello there"


@pytest.mark.parametrize(
    "request_fields",
    [
        dict(prompt="Hello there"),
        dict(messages=(ChatMessage("system", "Be brief."), ChatMessage("user", "Name a fruit."))),
    ],
)
def test_the_ingress_predicts_from_the_text_the_intake_hands_the_predictor(
    intake: Intake, request_fields
) -> None:
    """The ingress starts the predictor before the intake has run; it must read the same text."""
    from cluster.generation import early_predictor_text

    request = GenerationInput(max_tokens=4, **request_fields)
    limit = intake.limits.max_prompt_chars
    assert early_predictor_text(request, limit) == intake.prepare(request).predictor_text
    assert early_predictor_text(GenerationInput(prompt="x" * (limit + 1)), limit) is None
    assert early_predictor_text(GenerationInput(prompt=""), limit) is None
    assert early_predictor_text(GenerationInput(messages=()), limit) is None
