"""The OpenAI API's request and response bodies, and their translation to and from the shared path.

    body = ChatCompletionRequest.model_validate(json)      # unknown fields ignored, as OpenAI does
    request = body.to_input()                               # a GenerationInput for cluster/intake.py
    chat_completion(model_id, chunks, ...)                   # the JSON of a whole answer

Fields keep OpenAI's meaning; their ranges are checked once, in ``cluster/intake.py``, for gRPC and
HTTP alike. Beyond OpenAI's fields a body may carry ``top_k``, ``repetition_penalty`` and ``ignore_eos``
(as vLLM accepts them); every response carries ``binserve``: the predicted output length and the bin.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from cluster.generation import GenerationChunk
from cluster.intake import GenerationInput
from pipeline.chat import ChatMessage
from pipeline.request import FinishReason
from pipeline.sampling import FIELD_NAMES


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessageBody(_Body):
    role: str
    content: str | list[ContentPart] | None = None


class _SamplingBody(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logprobs: Any = None
    # Extensions (vLLM accepts the same names).
    top_k: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _sampling(self, max_tokens: int | None) -> dict[str, Any]:
        if self.n not in (None, 1):
            raise ValueError(f"n: only 1 choice per request is supported, got {self.n}")
        if self.logprobs not in (None, False, 0):
            raise ValueError("logprobs: not supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream: true")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        sampling = {name: getattr(self, name) for name in FIELD_NAMES}
        return {**sampling, "max_tokens": max_tokens, "stop": stop, "ignore_eos": self.ignore_eos}


class ChatCompletionRequest(_SamplingBody):
    messages: list[ChatMessageBody]
    max_completion_tokens: int | None = None

    def to_input(self) -> GenerationInput:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return GenerationInput(
            messages=tuple(_message(i, m) for i, m in enumerate(self.messages)), **self._sampling(max_tokens)
        )


class CompletionRequest(_SamplingBody):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def to_input(self) -> GenerationInput:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError(f"prompt: one prompt per request is supported, got {len(self.prompt)}")
        for name, is_used in (("echo", self.echo), ("suffix", self.suffix is not None)):
            if is_used:
                raise ValueError(f"{name}: not supported")
        if self.best_of not in (None, 1):
            raise ValueError(f"best_of: only 1 is supported, got {self.best_of}")
        prompt = self.prompt[0] if isinstance(self.prompt, list) else self.prompt
        return GenerationInput(prompt=prompt, **self._sampling(self.max_tokens))


# The roles OpenAI's newer models take for instructions: the system turn of a chat template.
_ROLE_ALIASES = {"developer": "system"}


def _message(index: int, message: ChatMessageBody) -> ChatMessage:
    content = message.content
    if isinstance(content, list):
        for j, part in enumerate(content):
            if part.type != "text" or part.text is None:
                raise ValueError(f"messages[{index}].content[{j}].type: only text parts are supported")
        content = "\n".join(part.text for part in content)
    return ChatMessage(_ROLE_ALIASES.get(message.role, message.role), content or "")


# ---- responses ----------------------------------------------------------------------------------------

FINISH_REASONS = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.ABORT: "abort"}
Kind = Literal["chat", "text"]


def completion_id(kind: Kind, request_id: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{request_id}"


def usage_of(chunk: GenerationChunk) -> dict[str, Any]:
    final = chunk.final
    return {
        "prompt_tokens": final.num_prompt_tokens,
        "completion_tokens": final.num_output_tokens,
        "total_tokens": final.num_prompt_tokens + final.num_output_tokens,
        "prompt_tokens_details": {"cached_tokens": final.num_cached_prompt_tokens},
    }


def extension_of(chunk: GenerationChunk) -> dict[str, Any]:
    """binserve's extension field: where the request went, and (last chunk) its timings."""
    extension: dict[str, Any] = {
        "predicted_output_tokens": chunk.routing.predicted_output_tokens,
        "bin": chunk.routing.bin_id,
    }
    if chunk.final is not None:
        extension.update(ttft_s=chunk.final.ttft_s, predict_s=chunk.final.predict_s)
    return extension


def completion(kind: Kind, model_id: str, chunks: Sequence[GenerationChunk]) -> dict[str, Any]:
    """A whole (non-streamed) answer from all of a request's chunks."""
    last, text = chunks[-1], "".join(c.text for c in chunks)
    choice: dict[str, Any] = {
        "index": 0,
        "finish_reason": FINISH_REASONS[last.finish_reason],
        "logprobs": None,
    }
    if kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": completion_id(kind, last.routing.request_id),
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": [choice],
        "usage": usage_of(last),
        "binserve": extension_of(last),
    }


def stream_chunk(
    kind: Kind, model_id: str, chunk: GenerationChunk, created: int, is_first: bool, include_usage: bool
) -> dict[str, Any]:
    """One streamed event: the new text (the first chat event also names the role), the finish reason
    on the last. With ``include_usage`` every event has ``usage: null`` and a last one carries it."""
    choice: dict[str, Any] = {
        "index": 0,
        "finish_reason": None if chunk.finish_reason is None else FINISH_REASONS[chunk.finish_reason],
        "logprobs": None,
    }
    if kind == "chat":
        choice["delta"] = (
            {"role": "assistant", "content": chunk.text} if is_first else {"content": chunk.text}
        )
    else:
        choice["text"] = chunk.text
    event = _event_head(kind, model_id, chunk, created)
    event["choices"] = [choice]
    if include_usage:
        event["usage"] = None
    event["binserve"] = extension_of(chunk)
    return event


def usage_chunk(kind: Kind, model_id: str, last: GenerationChunk, created: int) -> dict[str, Any]:
    """``stream_options.include_usage``: the event after the last, with no choices and the usage."""
    return {**_event_head(kind, model_id, last, created), "choices": [], "usage": usage_of(last)}


def _event_head(kind: Kind, model_id: str, chunk: GenerationChunk, created: int) -> dict[str, Any]:
    return {
        "id": completion_id(kind, chunk.routing.request_id),
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": created,
        "model": model_id,
    }
