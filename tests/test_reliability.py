"""Faults and abuse on the served application: fuzzed gRPC requests and HTTP bodies, overload, a cancel
storm, and a killed stage and replica under load (small scale; `binserve bench reliability` is the full).

One application: deploy/serve-local.yaml made small (tests/test_cluster.py's ``serving``), with one
engine pool that is a 2-stage pipeline, so a stage actor can be killed. The fuzz tests come first, the
kills last (they make Serve replace the replica).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator

import grpc
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import reliability
from proto.binserve.v1 import generation_pb2 as pb
from proto.binserve.v1 import generation_pb2_grpc as pb_grpc
from tests.test_cluster import MAX_QUEUED_REQUESTS, Cluster, serving

NUM_POOLS = 1
ALLOWED_GRPC_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,  # the fuzzer's own deadline, so long generations end
}
ALLOWED_HTTP_STATUSES = {200, 400, 404, 422, 429}


@pytest.fixture(scope="module")
def app(chat_model: str) -> Iterator[Cluster]:
    def one_pipelined_pool(raw: dict) -> None:
        args = raw["applications"][0]["args"]
        args["router"]["num_pools"] = NUM_POOLS
        args["parallel"]["pp_size"] = 2

    with serving(chat_model, one_pipelined_pool) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def chat_model(tiny_llama: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.test_chat import make_chat_model

    return make_chat_model(tiny_llama, tmp_path_factory.mktemp("reliability") / "tiny-chat")


def blocks_in_use() -> int:
    return reliability.kv_blocks_in_use(NUM_POOLS)


def settle() -> int:
    """KV blocks still allocated once the traffic has drained (90 s at most)."""
    asyncio.run(reliability.wait_for_no_blocks(NUM_POOLS, timeout_s=90))
    return blocks_in_use()


# ---- fuzzing --------------------------------------------------------------------------------------------

texts = st.one_of(
    st.text(max_size=64),
    st.text(min_size=1, max_size=8).map(lambda t: t * 4000),  # huge prompts
    st.sampled_from(["", " ", "\x00", "\ud7ff\ue000", "Hello"]),
)
small_or_extreme_ints = st.one_of(st.integers(-3, 6), st.sampled_from([0, -1, 2**31 - 1, -(2**31), 100_000]))
any_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 0.5, 1.0, 2.0, 1e308])
)
roles = st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "", "User"]), st.text(max_size=6))


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    request = pb.GenerateRequest(
        stop=draw(st.lists(st.text(max_size=20), max_size=40)),
        ignore_eos=draw(st.booleans()),
        request_id=draw(st.one_of(st.just(""), st.text(max_size=12), st.just("fixed-id"))),
    )
    if draw(st.booleans()):
        request.prompt = draw(texts)
    if draw(st.booleans()):
        for role, content in draw(st.lists(st.tuples(roles, texts), max_size=12)):
            request.messages.add(role=role, content=content)
    for name, values in (
        ("max_tokens", small_or_extreme_ints),
        ("top_k", small_or_extreme_ints),
        ("temperature", any_floats),
        ("top_p", any_floats),
        ("repetition_penalty", any_floats),
        ("presence_penalty", any_floats),
        ("frequency_penalty", any_floats),
        ("seed", st.integers(-(2**63), 2**63 - 1)),
    ):
        value = draw(st.one_of(st.none(), values))
        if value is not None:
            setattr(request, name, value)
    return request


@pytest.fixture(scope="module")
def stub(app: Cluster) -> Iterator[pb_grpc.GenerationStub]:
    with grpc.insecure_channel(app.address) as channel:
        yield pb_grpc.GenerationStub(channel)


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(request=generate_requests(), stream=st.booleans())
def test_fuzzed_grpc_requests_never_fail_internally(
    stub: pb_grpc.GenerationStub, request, stream: bool
) -> None:
    try:
        if stream:
            for _ in stub.GenerateStream(request, timeout=3.0):
                pass
        else:
            stub.Generate(request, timeout=3.0)
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()
    assert code in ALLOWED_GRPC_CODES, (code, request)


def test_invalid_utf8_is_refused_and_the_service_stays_healthy(app: Cluster, stub) -> None:
    # A prompt field whose bytes are not UTF-8: a client that skips protobuf's own check sends this.
    raw = pb.GenerateRequest(max_tokens=2).SerializeToString() + b"\x0a\x03\xff\xfe\xfd"
    with grpc.insecure_channel(app.address) as channel:
        call = channel.unary_unary(
            "/binserve.v1.Generation/Generate",
            request_serializer=None,
            response_deserializer=pb.GenerateResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as failure:
            call(raw, timeout=10)
    assert failure.value.code() in ALLOWED_GRPC_CODES | {grpc.StatusCode.UNKNOWN}, failure.value
    assert stub.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=2), timeout=30).token_ids


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**40), 2**40),
        st.floats(allow_nan=False),
        st.text(max_size=20),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
FIELDS = [
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "seed",
    "n",
    "stream",
    "stream_options",
    "user",
]


@st.composite
def http_bodies(draw: st.DrawFn) -> tuple[str, object]:
    path = draw(st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
    body: dict = {"model": draw(st.sampled_from(["tiny-chat", "other", ""]))}
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=8, unique=True)):
        body[name] = draw(json_values)
    if draw(st.booleans()):
        body["messages"] = draw(
            st.lists(st.fixed_dictionaries({"role": roles, "content": texts}), max_size=4)
        )
        body["max_tokens"] = draw(small_or_extreme_ints)
    if draw(st.integers(0, 9)) == 0:
        return path, draw(json_values)  # not an object at all
    return path, body


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(case=http_bodies())
def test_fuzzed_http_bodies_never_fail_internally(app: Cluster, case: tuple[str, object]) -> None:
    path, body = case
    try:
        with requests.post(app.http_url + path, data=json.dumps(body), stream=True, timeout=3.0) as response:
            status = response.status_code
            for _ in response.iter_content(chunk_size=None):
                pass
    except (requests.Timeout, requests.ConnectionError):
        return  # our own deadline on a long generation: the disconnect aborts it
    assert status in ALLOWED_HTTP_STATUSES, (status, body)


def test_after_the_fuzzing_no_kv_block_is_allocated_and_all_is_served(app: Cluster, stub) -> None:
    assert settle() == 0
    assert stub.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=3), timeout=30).token_ids


# ---- load and faults ------------------------------------------------------------------------------------


def test_overload_is_refused_fast_and_admitted_requests_complete(app: Cluster) -> None:
    capacity = NUM_POOLS * MAX_QUEUED_REQUESTS
    report = asyncio.run(reliability.overload(app.address, 10 * capacity, NUM_POOLS, max_tokens=16))
    assert report.num_other == {}
    assert report.num_completed + report.num_refused == report.num_calls
    assert report.num_completed >= capacity  # what the queues hold is served
    assert report.num_refused > 0
    assert report.kv_blocks_in_use_after == 0


def test_a_cancel_storm_leaves_no_block_allocated(app: Cluster) -> None:
    # As many streams as the ingress admits at once (a larger storm is partly refused: the overload test).
    num_streams = NUM_POOLS * MAX_QUEUED_REQUESTS
    report = asyncio.run(reliability.cancel_storm(app.address, num_streams, NUM_POOLS, seed=1))
    assert report.num_cancelled + report.num_deadlines + report.num_ran_to_completion == num_streams
    assert report.num_refused == 0
    assert report.seconds_until_no_blocks is not None
    assert report.kv_blocks_in_use_after == 0


@pytest.mark.parametrize("target", ["stage", "replica"])
def test_a_killed_stage_or_replica_fails_in_flight_calls_and_serve_recovers(
    app: Cluster, target: str
) -> None:
    report = asyncio.run(reliability.kill_under_load(app.address, target, NUM_POOLS, num_streams=3))
    assert set(report.codes) == {"UNAVAILABLE"}, report
    assert (
        report.seconds_until_failed_calls_ended is not None and report.seconds_until_failed_calls_ended < 30.0
    )
    assert report.seconds_until_served_again is not None and not math.isnan(report.seconds_until_served_again)
