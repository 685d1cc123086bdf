"""Security at the ingress: the API key (gRPC metadata and HTTP header), request size limits, and the
gRPC proxy's message size bound, on a running application (tiny model with a chat template).

The key reaches the ingress replica the way a deployment keeps it out of its args: as the
``BINSERVE_API_KEY`` environment variable of the application's ``runtime_env``. The proxy's bound is
Serve's ``RAY_SERVE_GRPC_MAX_MESSAGE_SIZE``, set through the config's ``controller_options`` (the
controller starts the proxies, which inherit its environment).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import grpc
import openai
import pytest

from cluster.auth import API_KEY_ENV, ApiKey
from cluster.client import GenerationClient, make_request
from cluster.config import IngressConfig
from cluster.errors import Unauthenticated
from tests.test_chat import make_chat_model
from tests.test_cluster import Cluster, serving

API_KEY = "test-key-0123456789"
MAX_GRPC_MESSAGE_BYTES = 1 << 20
LIMITS = dict(
    max_prompt_chars=100_000,
    max_prompt_tokens=1000,
    max_stop_strings=4,
    max_stop_string_chars=16,
    max_messages=3,
)


def test_the_key_comes_from_the_yaml_else_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert ApiKey.of(IngressConfig(api_key="from-yaml")).key == "from-yaml"
    assert ApiKey.of(IngressConfig()).key == "from-env"
    monkeypatch.setenv(API_KEY_ENV, "  ")
    assert not ApiKey.of(IngressConfig()).is_required  # blank: no key
    key = ApiKey("k")
    key.check("Bearer k")
    key.check("bearer k")
    for bad in (None, "", "k", "Bearer", "Bearer kk", "Basic k"):
        with pytest.raises(Unauthenticated, match="authorization: a valid API key is required"):
            key.check(bad)
    with pytest.raises(ValueError, match="api_key: must be a non-blank string"):
        IngressConfig(api_key=" ")


@pytest.fixture(scope="module")
def app(tiny_llama: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    def configure(raw: dict) -> None:
        raw["controller_options"] = {
            "runtime_env": {"env_vars": {"RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(MAX_GRPC_MESSAGE_BYTES)}}
        }
        application = raw["applications"][0]
        application["runtime_env"] = {"env_vars": {API_KEY_ENV: API_KEY}}
        application["args"]["ingress"].update(LIMITS)

    model_dir = make_chat_model(tiny_llama, tmp_path_factory.mktemp("security") / "tiny-chat")
    with serving(model_dir, configure) as cluster:
        yield cluster


async def grpc_call(app: Cluster, request, api_key: str | None, rpc: str = "generate"):
    async with GenerationClient(app.address, api_key=api_key) as client:
        if rpc == "info":
            return await client.model_info(timeout_s=60)
        if rpc == "stream":
            return [m async for m in client.generate_stream(request, timeout_s=60)]
        return await client.generate(request, timeout_s=60)


def grpc_failure(app: Cluster, request, api_key: str | None = API_KEY, rpc: str = "generate"):
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        asyncio.run(grpc_call(app, request, api_key, rpc))
    return failure.value


@pytest.mark.parametrize("rpc", ["generate", "stream", "info"])
@pytest.mark.parametrize("api_key", [None, "wrong-key"], ids=["no key", "wrong key"])
def test_grpc_without_the_key_is_unauthenticated(app: Cluster, rpc: str, api_key: str | None) -> None:
    failure = grpc_failure(app, make_request("Hello", max_tokens=4), api_key, rpc)
    assert failure.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "authorization" in failure.details()


def test_grpc_with_the_key_is_served(app: Cluster) -> None:
    reply = asyncio.run(grpc_call(app, make_request("Hello", max_tokens=4), API_KEY))
    assert reply.usage.num_output_tokens == 4
    assert asyncio.run(grpc_call(app, None, API_KEY, "info")).has_chat_template


def openai_client(app: Cluster, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app.http_url}/v1", api_key=api_key, max_retries=0, timeout=60)


def test_http_without_the_key_is_401_and_with_it_200(app: Cluster) -> None:
    import httpx2 as httpx

    for call in (
        lambda c: c.models.list(),
        lambda c: c.completions.create(model="tiny-chat", prompt="Hello", max_tokens=4),
    ):
        with pytest.raises(openai.AuthenticationError) as failure:
            call(openai_client(app, "wrong-key"))
        assert failure.value.status_code == 401 and failure.value.body["code"] == "invalid_api_key"
    response = httpx.post(f"{app.http_url}/v1/completions", json={"prompt": "Hello"})  # no header at all
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    # The key is checked before the body: a bad body without the key says nothing about the API.
    response = httpx.post(f"{app.http_url}/v1/chat/completions", json={"messages": "not a list"})
    assert response.status_code == 401
    assert httpx.get(f"{app.http_url}/health").status_code == 200  # load balancers probe without a key
    client = openai_client(app, API_KEY)
    assert [m.id for m in client.models.list()] == ["tiny-chat"]
    answer = client.completions.create(model="tiny-chat", prompt="Hello", max_tokens=4, temperature=0)
    assert answer.usage.completion_tokens == 4


LIMIT_CASES = [
    (dict(prompt="x" * 100_001), "prompt", r"prompt: at most 100000 characters, got 100001"),
    (
        dict(prompt="word " * 1500),
        "prompt",
        r"prompt: \d+ tokens, must be at most 1000 \(max_model_len 4096 minus one output token, or "
        r"ingress.max_prompt_tokens\)",
    ),
    (dict(prompt="Hi", stop=["a", "b", "c", "d", "e"]), "stop", r"stop: at most 4 strings, got 5"),
    (dict(prompt="Hi", stop=["x" * 17]), "stop[0]", r"stop\[0\]: at most 16 characters, got 17"),
    (dict(messages=[("user", "Hi")] * 4), "messages", r"messages: must hold 1 to 3 messages, got 4"),
    (
        dict(messages=[("user", "x" * 60_000), ("user", "y" * 40_001)]),
        "messages",
        r"messages: at most 100000 characters of content in all, got 100001",
    ),
]


@pytest.mark.parametrize(("fields", "param", "message"), LIMIT_CASES)
def test_size_limits_are_invalid_argument_over_grpc(
    app: Cluster, fields: dict, param: str, message: str
) -> None:
    failure = grpc_failure(app, make_request(**{"max_tokens": 4, **fields}))
    assert failure.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, failure.details()), failure.details()


@pytest.mark.parametrize(("fields", "param", "message"), LIMIT_CASES)
def test_size_limits_are_400_over_http(app: Cluster, fields: dict, param: str, message: str) -> None:
    client = openai_client(app, API_KEY)
    with pytest.raises(openai.BadRequestError) as failure:
        if "messages" in fields:
            messages = [{"role": r, "content": c} for r, c in fields["messages"]]
            client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=4)
        else:
            client.completions.create(model="tiny-chat", max_tokens=4, **fields)
    assert failure.value.body["param"] == param
    assert re.search(message, failure.value.body["message"]), failure.value.body


def test_the_grpc_proxy_refuses_messages_over_its_bound_and_keeps_serving(app: Cluster) -> None:
    failure = grpc_failure(app, make_request("x" * (MAX_GRPC_MESSAGE_BYTES + 1), max_tokens=4))
    assert failure.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, failure.details()
    assert re.search(r"larger than max", failure.details()), failure.details()
    reply = asyncio.run(grpc_call(app, make_request("Hello", max_tokens=4), API_KEY))
    assert reply.usage.num_output_tokens == 4
