"""The OpenAI-compatible HTTP API, tested with the official ``openai`` client against the running app.

One application (deploy/serve-local.yaml made small, as in tests/test_cluster.py) serves gRPC and HTTP
together from one Serve config; the model is the tiny checkpoint given a ChatML template. Greedy
decoding makes texts comparable across the two APIs and between streamed and whole answers.
"""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from ray.serve.exceptions import BackPressureError

from cluster.client import GenerationClient, make_request
from cluster.errors import Unauthenticated, UnknownModel
from cluster.openai_api import error_response
from pipeline.driver import EngineDeadError, QueueFullError
from tests.calls import first_codes
from tests.test_cluster import (
    MAX_QUEUED_REQUESTS,
    Cluster,
    assert_no_kv_block_allocated,
    num_cancelled,
    one_by_one,
    wait_until_idle,
)

MODEL_ID = "tiny-chat"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France? Answer in one word."},
]
GREEDY = dict(model=MODEL_ID, temperature=0.0, max_tokens=24)
LONG = dict(max_tokens=3000, extra_body={"ignore_eos": True})
"""Thousands of forced tokens: seconds of work for the tiny model, so a request is still running."""


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (ValueError("top_p: must be in (0, 1], got 5"), 400, None),
        (Unauthenticated("authorization: a valid API key is required"), 401, "invalid_api_key"),
        (UnknownModel("model: 'gpt-4o' is not served here"), 404, "model_not_found"),
        (QueueFullError("queue is full: 16 unfinished requests"), 429, "queue_full"),
        (BackPressureError(num_queued_requests=16, max_queued_requests=16), 429, "queue_full"),
        (EngineDeadError("engine is unhealthy"), 503, "engine_unavailable"),
        (RuntimeError("a bug"), 500, "internal_error"),
    ],
)
def test_failures_map_to_openais_status_and_error_body(exc: Exception, status: int, code: str | None) -> None:
    response = error_response(exc)
    body = json.loads(response.body)["error"]
    assert response.status_code == status and body["code"] == code
    assert body["param"] == ("top_p" if status == 400 else None)
    assert body["message"] == (str(exc) if status != 500 else "internal error: RuntimeError")


@pytest.fixture(scope="module")
def app(shared_cluster: Cluster) -> Cluster:
    assert shared_cluster.model_dir.endswith(MODEL_ID)  # the model id is the checkpoint directory's name
    return shared_cluster


def sync_client(app: Cluster) -> openai.OpenAI:
    # No retries: a 429 or 503 must reach the test, not be retried away.
    return openai.OpenAI(base_url=f"{app.http_url}/v1", api_key="unused", max_retries=0, timeout=120)


def async_client(app: Cluster) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{app.http_url}/v1", api_key="unused", max_retries=0, timeout=120)


def grpc_chat(app: Cluster, messages: list[dict], max_tokens: int):
    async def main():
        async with GenerationClient(app.address) as client:
            pairs = [(m["role"], m["content"]) for m in messages]
            return await client.generate(make_request(messages=pairs, max_tokens=max_tokens, temperature=0.0))

    return asyncio.run(main())


def test_models_lists_the_served_model(app: Cluster) -> None:
    client = sync_client(app)
    assert [m.id for m in client.models.list()] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_chat_streamed_equals_whole_equals_grpc(app: Cluster) -> None:
    whole = sync_client(app).chat.completions.create(messages=MESSAGES, **GREEDY)

    async def streamed() -> tuple[list[str], list]:
        client = async_client(app)
        stream = await client.chat.completions.create(messages=MESSAGES, stream=True, **GREEDY)
        chunks = [chunk async for chunk in stream]
        await client.close()
        return [c.choices[0].delta.content or "" for c in chunks if c.choices], chunks

    pieces, chunks = asyncio.run(streamed())
    via_grpc = grpc_chat(app, MESSAGES, GREEDY["max_tokens"])
    text = whole.choices[0].message.content
    assert text and "".join(pieces) == text == via_grpc.text
    assert whole.choices[0].message.role == "assistant" and chunks[0].choices[0].delta.role == "assistant"
    assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == len(via_grpc.token_ids) == 24
    assert whole.usage.prompt_tokens == via_grpc.usage.num_prompt_tokens
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 24
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion" and whole.model == MODEL_ID
    # The extension field: where the length-aware path sent it (the same prediction as over gRPC).
    extension = whole.model_extra["binserve"]
    assert (
        extension["bin"] == via_grpc.bin
        and extension["predicted_output_tokens"] == via_grpc.predicted_output_tokens
    )


def test_a_resent_conversation_reports_its_cached_prompt_tokens(app: Cluster) -> None:
    """One replica per pool and the same prediction for the same prompt: the resend finds the first
    call's full blocks (16 tokens each; the last token is always computed) in its replica's cache."""
    messages = [
        {"role": "system", "content": "You answer in one short sentence, always politely and in English."},
        {"role": "user", "content": "Which is larger, a whale or a mouse, and by roughly how much?"},
    ]
    first = sync_client(app).chat.completions.create(messages=messages, **GREEDY)
    again = sync_client(app).chat.completions.create(messages=messages, **GREEDY)
    via_grpc = grpc_chat(app, messages, GREEDY["max_tokens"])
    num_prompt_tokens = first.usage.prompt_tokens
    assert again.choices[0].message.content == first.choices[0].message.content
    num_cached = (num_prompt_tokens - 1) // 16 * 16
    assert again.usage.prompt_tokens_details.cached_tokens == num_cached > 0
    assert via_grpc.usage.num_cached_prompt_tokens == num_cached


def test_completions_equal_grpc_for_the_same_prompt(app: Cluster) -> None:
    prompt = "Write a haiku about paged attention."
    whole = sync_client(app).completions.create(prompt=prompt, stop=[], **GREEDY)

    async def main():
        async with GenerationClient(app.address) as client:
            return await client.generate(make_request(prompt, max_tokens=24, temperature=0.0))

    via_grpc = asyncio.run(main())
    assert whole.object == "text_completion" and whole.choices[0].text == via_grpc.text
    assert whole.usage.prompt_tokens == via_grpc.usage.num_prompt_tokens


def test_a_stop_string_cuts_the_text_in_both_apis(app: Cluster) -> None:
    full = sync_client(app).completions.create(prompt="Tell me a story.", **GREEDY).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    client = sync_client(app)
    for stop_field in (stop, [stop, "never there"]):  # a string or a list, as OpenAI takes it
        cut = client.completions.create(prompt="Tell me a story.", stop=stop_field, **GREEDY)
        assert cut.choices[0].text == full.split(stop)[0] and cut.choices[0].finish_reason == "stop"


def test_a_coalesced_sse_stream_stops_where_one_token_per_message_stops(app: Cluster) -> None:
    from workers.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(app.model_dir)
    prompt, forced = "Tell me a story.", dict(max_tokens=40, extra_body={"ignore_eos": True})

    async def whole_tokens():
        async with GenerationClient(app.address) as client:
            return await client.generate(
                make_request(prompt, max_tokens=40, ignore_eos=True, temperature=0.0)
            )

    token_ids = list(asyncio.run(whole_tokens()).token_ids)
    full = tokenizer.decode(token_ids, skip_special_tokens=True)
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # inside a message of several tokens
    text, kept = one_by_one(tokenizer, token_ids, [stop])
    client = sync_client(app)
    options = dict(model=MODEL_ID, prompt=prompt, stop=[stop], temperature=0.0, **forced)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **options))
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(pieces) == text and len(pieces) < len(kept)  # coalesced: fewer events than tokens
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-1].usage.completion_tokens == len(kept)
    whole = client.completions.create(**options)
    assert whole.choices[0].text == text and whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens == len(kept)
    assert_no_kv_block_allocated(wait_until_idle(app))


def test_include_usage_sends_a_last_chunk_with_the_usage(app: Cluster) -> None:
    stream = sync_client(app).chat.completions.create(
        messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"


def test_the_sse_stream_ends_with_done_and_unknown_fields_are_ignored(app: Cluster) -> None:
    import httpx2 as httpx  # the openai client's own HTTP library

    body = {"messages": MESSAGES, "stream": True, "max_tokens": 4, "temperature": 0, "logit_bias": {}, "x": 1}
    with httpx.stream("POST", f"{app.http_url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert events[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in events[-1]
    assert httpx.get(f"{app.http_url}/health").json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        (dict(max_tokens=0), "max_tokens", "max_tokens: must be in [1, 3000], got 0"),
        (dict(temperature=-1), "temperature", "temperature: must be in [0.0, 2.0], got -1"),
        (dict(top_p=5), "top_p", "top_p: must be in (0, 1], got 5"),
        (dict(messages=[]), "messages", "messages: must hold 1 to 8 messages, got 0"),
        (dict(n=2), "n", "n: only 1 choice per request is supported, got 2"),
        (dict(presence_penalty=3), "presence_penalty", "presence_penalty: must be in [-2.0, 2.0], got 3"),
        (dict(frequency_penalty=-2.5), "frequency_penalty", "frequency_penalty: must be in [-2.0, 2.0]"),
        (dict(stop=[""]), "stop[0]", "stop[0]: must be a non-empty string"),
        (
            dict(messages=[{"role": "robot", "content": "x"}]),
            "messages[0].role",
            "must be one of system, user",
        ),
        (dict(temperature="hot"), "temperature", "temperature: Input should be a valid number"),
    ],
)
def test_bad_fields_are_400_naming_the_field_and_its_range(
    app: Cluster, fields: dict, param: str, message: str
) -> None:
    request = {"messages": MESSAGES, **GREEDY, **fields}
    with pytest.raises(openai.BadRequestError) as failure:
        sync_client(app).chat.completions.create(**request)
    error = failure.value.body
    assert failure.value.status_code == 400 and error["param"] == param, error
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_an_unknown_model_is_404(app: Cluster) -> None:
    with pytest.raises(openai.NotFoundError) as failure:
        sync_client(app).chat.completions.create(messages=MESSAGES, **{**GREEDY, "model": "gpt-4o"})
    assert failure.value.status_code == 404 and failure.value.body["code"] == "model_not_found"


def test_a_client_that_disconnects_mid_stream_frees_its_kv_blocks(app: Cluster) -> None:
    cancelled_before = num_cancelled(app)

    async def main():
        client = async_client(app)
        stream = await client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, stream=True, **LONG)
        chunks = [await stream.__anext__() for _ in range(3)]
        held = [await app.stats_async(p) for p in (0, 1)]
        await stream.close()  # the client goes away mid-stream
        await client.close()
        return chunks, held

    chunks, held = asyncio.run(main())
    assert all(c.choices[0].delta.content is not None for c in chunks)
    assert sum(s.num_kv_blocks - s.num_free_kv_blocks for s in held) > 0  # it was running
    assert_no_kv_block_allocated(wait_until_idle(app, 90.0))
    assert num_cancelled(app) == cancelled_before + 1  # aborted in the engine, not run to its end


def test_a_full_queue_is_429_and_nothing_leaks(app: Cluster) -> None:
    async def one(client: openai.AsyncOpenAI) -> str:
        try:
            await client.completions.create(model=MODEL_ID, prompt="Tell me a very long story.", **LONG)
        except openai.APIStatusError as exc:
            return str(exc.status_code)
        return "200"

    async def main() -> list[str]:
        client = async_client(app)
        # Both pools hold MAX_QUEUED_REQUESTS each and Serve queues as many in front: send 3x that.
        codes = await first_codes(lambda: one(client), 6 * MAX_QUEUED_REQUESTS)
        await client.close()
        return codes

    codes = asyncio.run(main())
    assert "429" in codes, codes
    assert_no_kv_block_allocated(wait_until_idle(app, 90.0))
