"""A request's intake, one path for both APIs: check it, fill in the serving defaults, render a
conversation, tokenize.

    intake = Intake(tokenizer, config.ingress, SamplingDefaults.resolve(model_dir, config.sampling),
                    max_model_len)
    prepared = intake.prepare(GenerationInput(messages=(ChatMessage("user", "Hi"),), temperature=0.0))
    prepared.prompt_token_ids, prepared.params, prepared.stop, prepared.predictor_text

gRPC (``cluster/ingress.py``) and HTTP (``cluster/openai_protocol.py``) only translate their wire format
into a ``GenerationInput``; every check lives here, in the order that costs least first (presence and
size, then ranges, then the tokenizer), and fails with a ``ValueError`` naming the field and its limit.
Ranges are OpenAI's where OpenAI has the field (temperature in [0, 2], penalties in [-2, 2]).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from cluster.config import IngressConfig, SamplingDefaultsConfig
from pipeline.chat import ChatMessage, check_messages, predictor_text, render_chat
from pipeline.config import check_range
from pipeline.request import SamplingParams
from pipeline.sampling import FIELD_NAMES, FIELDS, check_sampling
from workers.checkpoint import model_sampling_defaults_of


@dataclass(frozen=True)
class GenerationInput:
    """A request as either API received it, unchecked; ``None`` is a field the caller left unset."""

    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    request_id: str = ""


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request that leaves a field unset gets, resolved once per ingress replica."""

    max_tokens: int | None = None
    """``None``: as many as the context and ``ingress.max_output_tokens`` allow."""
    temperature: float = FIELDS["temperature"].default  # type: ignore[assignment]
    top_p: float = FIELDS["top_p"].default  # type: ignore[assignment]
    top_k: int = FIELDS["top_k"].default  # type: ignore[assignment]
    repetition_penalty: float = FIELDS["repetition_penalty"].default  # type: ignore[assignment]
    presence_penalty: float = FIELDS["presence_penalty"].default  # type: ignore[assignment]
    frequency_penalty: float = FIELDS["frequency_penalty"].default  # type: ignore[assignment]

    @classmethod
    def resolve(cls, model_dir: str | Path, config: SamplingDefaultsConfig) -> SamplingDefaults:
        """The deployment's YAML first, then the model's ``generation_config.json``, then the engine's
        defaults (``pipeline/sampling.py``)."""
        from_model = model_sampling_defaults_of(model_dir)
        from_yaml = {k: v for k, v in vars(config).items() if v is not None}
        return cls(**{**from_model, **from_yaml})


@dataclass(frozen=True)
class PreparedRequest:
    """A checked request, ready to predict and route."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    stop: tuple[str, ...]
    predictor_text: str
    """What the length predictor sees: the prompt, or a conversation's last user message."""


class Intake:
    def __init__(
        self, tokenizer, limits: IngressConfig, defaults: SamplingDefaults, max_model_len: int
    ) -> None:  # a transformers tokenizer
        self.tokenizer = tokenizer
        self.limits = limits
        self.defaults = defaults
        self.max_model_len = max_model_len
        # One output token must fit after the prompt (the engine refuses anything longer, too).
        self.max_prompt_tokens = min(limits.max_prompt_tokens or max_model_len, max_model_len - 1)

    @property
    def has_chat_template(self) -> bool:
        return self.tokenizer.chat_template is not None

    def prepare(self, request: GenerationInput) -> PreparedRequest:
        text, field = self._prompt_text(request)
        params = self._sampling_params(request)
        stop = self._stop(request.stop)
        # A rendered conversation carries its template's special tokens; a plain prompt gets whatever the
        # tokenizer adds by default (as transformers' pipelines do).
        encoded = self.tokenizer(text, add_special_tokens=request.messages is None).input_ids
        if len(encoded) > self.max_prompt_tokens:
            what = "the rendered prompt is " if field == "messages" else ""
            also = ", or ingress.max_prompt_tokens" if self.limits.max_prompt_tokens else ""
            raise ValueError(
                f"{field}: {what}{len(encoded)} tokens, must be at most {self.max_prompt_tokens} "
                f"(max_model_len {self.max_model_len} minus one output token{also})"
            )
        if not encoded:
            raise ValueError(f"{field}: must have at least 1 token, got 0")
        if request.max_tokens is None and self.defaults.max_tokens is None:
            # OpenAI's default for an unset max_tokens: whatever room the context leaves.
            params = replace(params, max_tokens=min(params.max_tokens, self.max_model_len - len(encoded)))
        predicted_from = request.prompt if request.messages is None else predictor_text(request.messages)
        return PreparedRequest(request.request_id, tuple(encoded), params, stop, predicted_from)

    # ---- the checks ---------------------------------------------------------------------------------

    def _prompt_text(self, request: GenerationInput) -> tuple[str, str]:
        """The text to tokenize and the field it came from; sizes checked before any tokenizer work."""
        has_prompt, has_messages = request.prompt is not None, request.messages is not None
        if has_prompt == has_messages:
            raise ValueError(
                "prompt, messages: exactly one of them must be given, got "
                + ("both" if has_prompt else "neither")
            )
        limit = self.limits.max_prompt_chars
        if has_prompt:
            if not request.prompt:
                raise ValueError("prompt: must be a non-empty string")
            if len(request.prompt) > limit:
                raise ValueError(f"prompt: at most {limit} characters, got {len(request.prompt)}")
            return request.prompt, "prompt"
        check_messages(request.messages, self.limits.max_messages)
        num_chars = sum(len(m.content) for m in request.messages)
        if num_chars > limit:
            raise ValueError(f"messages: at most {limit} characters of content in all, got {num_chars}")
        return render_chat(self.tokenizer, request.messages), "messages"

    def _sampling_params(self, request: GenerationInput) -> SamplingParams:
        """The request's fields over the serving defaults, each checked against the one table of bounds
        (``pipeline/sampling.py``); ``max_tokens`` is also capped by ``ingress.max_output_tokens``."""
        limit = self.limits.max_output_tokens
        if request.max_tokens is not None:
            check_range("max_tokens", request.max_tokens, 1, limit)
        given = {name: getattr(request, name) for name in FIELD_NAMES}
        check_sampling(given)
        values = {
            **{k: v for k, v in vars(self.defaults).items() if v is not None},
            **{k: v for k, v in given.items() if v is not None},
        }
        values["max_tokens"] = min(values.get("max_tokens", limit), limit)
        return SamplingParams(**values, ignore_eos=request.ignore_eos)

    def _stop(self, stop: tuple[str, ...]) -> tuple[str, ...]:
        limits = self.limits
        if len(stop) > limits.max_stop_strings:
            raise ValueError(f"stop: at most {limits.max_stop_strings} strings, got {len(stop)}")
        for i, s in enumerate(stop):
            if not s:
                raise ValueError(f"stop[{i}]: must be a non-empty string")
            if len(s) > limits.max_stop_string_chars:
                raise ValueError(
                    f"stop[{i}]: at most {limits.max_stop_string_chars} characters, got {len(s)}"
                )
        return stop
