"""The serving cluster end to end: real Ray, real Serve, real gRPC over loopback, the tiny model.

One application (deploy/serve-local.yaml, made small) is deployed once for the module, the way
``binserve serve`` deploys it. The pure pieces (request validation, detokenization, the autoscaling
policy) are checked first, without Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import yaml

from cluster.autoscaling import OUTSTANDING_TOKENS_METRIC, PredictedTokensPolicy
from cluster.client import GenerationClient, make_request
from cluster.config import IngressConfig
from cluster.errors import Unauthenticated
from cluster.ingress import input_of, status_of
from cluster.intake import GenerationInput, Intake, SamplingDefaults
from cluster.text_stream import TextStream
from pipeline.chat import ChatMessage
from pipeline.driver import EngineDeadError, QueueFullError
from pipeline.request import SamplingParams
from proto.binserve.v1 import generation_pb2 as pb
from tests.calls import first_codes

SERVE_LOCAL = Path(__file__).resolve().parents[1] / "deploy" / "serve-local.yaml"
APP_NAME = "binserve"
MAX_QUEUED_REQUESTS = 16
MAX_OUTPUT_TOKENS = 3000
PROMPTS = [
    "Hello",
    "What is the capital of France? Please answer in one word.",
    "Write a detailed essay of at least 1500 words on the history of the Roman Empire, from the founding "
    "of Rome to the fall of Constantinople, covering its politics, economy, army, culture and legacy.",
    "a b c d e f g",
    "Write a long story about a dragon who learns to cook, with several chapters and plenty of dialogue.",
    "x",
    "Translate 'good morning' into French.",
    "Explain step by step, with code examples in Python, how to implement a web server with routing, "
    "middleware, templates, sessions and a database layer; discuss testing and deployment too.",
]
MAX_TOKENS = 20
MAX_MESSAGES = 8


# ---- pure: validation, detokenization, error mapping, autoscaling -----------------------------------


@pytest.fixture(scope="module")
def tiny_intake(tiny_llama: str) -> Intake:
    from workers.checkpoint import load_tokenizer

    return Intake(load_tokenizer(tiny_llama), IngressConfig(), SamplingDefaults(), max_model_len=4096)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(prompt=""), r"prompt, messages: exactly one of them must be given, got neither"),
        (dict(messages=[("user", "hi")]), r"prompt, messages: exactly one of them must be given, got both"),
        (dict(max_tokens=0), r"max_tokens: must be in \[1, 4096\], got 0"),
        (dict(max_tokens=5000), r"max_tokens: must be in \[1, 4096\], got 5000"),
        (dict(temperature=-0.5), r"temperature: must be in \[0.0, 2.0\], got -0.5"),
        (dict(temperature=math.nan), r"temperature: must be a finite number"),
        (dict(top_p=0.0), r"top_p: must be in \(0, 1\], got 0.0"),
        (dict(top_p=1.5), r"top_p: must be in \(0, 1\], got 1.5"),
        (dict(top_k=-1), r"top_k: must be in \[0, inf\], got -1"),
        (dict(seed=-3), r"seed: must be in \[0, 9223372036854775807\], got -3"),
        (dict(stop=["ok", ""]), r"stop\[1\]: must be a non-empty string"),
        (dict(stop=["s"] * 17), r"stop: at most 16 strings, got 17"),
        (dict(repetition_penalty=3.0), r"repetition_penalty: must be in \(0, 2\], got 3.0"),
    ],
)
def test_each_bad_field_of_the_proto_is_named(tiny_intake: Intake, fields: dict, message: str) -> None:
    request = make_request(**{"prompt": "hi", **fields})
    with pytest.raises(ValueError, match=message):
        tiny_intake.prepare(input_of(request))


def test_unset_proto_fields_are_unset_for_the_intake_and_set_ones_pass_through() -> None:
    assert input_of(make_request("hi")) == GenerationInput(prompt="hi")
    request = make_request(
        "",
        max_tokens=3,
        temperature=0.0,
        top_p=0.5,
        top_k=0,
        seed=0,
        messages=[("system", "s"), ("user", "u")],
        repetition_penalty=1.0,
        presence_penalty=0.0,
        frequency_penalty=-0.5,
    )
    assert input_of(request) == GenerationInput(
        messages=(ChatMessage("system", "s"), ChatMessage("user", "u")),
        max_tokens=3,
        temperature=0.0,
        top_p=0.5,
        top_k=0,
        seed=0,
        repetition_penalty=1.0,
        presence_penalty=0.0,
        frequency_penalty=-0.5,
    )  # an explicit 0 is kept, not replaced by a default


def test_serve_names_a_missing_model_or_predictor_directory_and_how_to_create_it(tmp_path: Path) -> None:
    from cluster.local import check_paths, load_serve_config

    missing = tmp_path / "no-model"
    config = load_serve_config(SERVE_LOCAL, model_dir=str(missing))
    with pytest.raises(ValueError) as failure:
        check_paths(config)
    message = str(failure.value)
    assert f"args.model.model_dir: {missing} does not exist" in message
    assert f"binserve prepare-model smollm2-135m-instruct {missing}" in message
    raw = yaml.safe_load(SERVE_LOCAL.read_text())
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    raw["applications"][0]["args"]["model"]["model_dir"] = str(model_dir)
    raw["applications"][0]["args"]["predictor"]["path"] = str(tmp_path / "no-predictor")
    config_path = tmp_path / "serve.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    with pytest.raises(
        ValueError, match=r"args.predictor.path: .*no-predictor does not exist. Train one with"
    ):
        check_paths(load_serve_config(config_path))


def test_failures_map_to_the_status_a_caller_can_act_on() -> None:
    assert status_of(ValueError("prompt: bad"))[0] is grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(QueueFullError("queue is full"))[0] is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(EngineDeadError("dead"))[0] is grpc.StatusCode.UNAVAILABLE
    assert status_of(RuntimeError("a bug")) is None  # Serve answers INTERNAL
    assert status_of(Unauthenticated("authorization: no"))[0] is grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: str):
    from workers.checkpoint import load_tokenizer

    return load_tokenizer(tiny_llama)


def test_text_stream_releases_exactly_the_decoded_text(tokenizer) -> None:
    text = "Hello wörld! Ünïcödé, emoji 🙂 and spaces   end."
    token_ids = tokenizer(text, add_special_tokens=False).input_ids
    stream = TextStream(tokenizer)
    pieces = [stream.push([t]) for t in token_ids] + [stream.finish()]
    assert "".join(pieces) == tokenizer.decode(token_ids, skip_special_tokens=True) == stream.text
    assert all("\ufffd" not in p for p in pieces)  # split characters are held back, never half-sent


@pytest.mark.parametrize("stop", ["wörld", "d!", "emoji 🙂", "never there"])
def test_text_stream_cuts_at_the_first_stop_string(tokenizer, stop: str) -> None:
    text = "Hello wörld! Ünïcödé, emoji 🙂 and spaces   end."
    stream = TextStream(tokenizer, [stop, "zzz"])
    pieces = []
    for t in tokenizer(text, add_special_tokens=False).input_ids:
        pieces.append(stream.push([t]))
        if stream.is_stopped:
            break
    pieces.append(stream.finish())
    expected = text.split(stop)[0]
    assert "".join(pieces) == stream.text == expected
    assert stream.is_stopped == (stop in text)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5, 100])
@pytest.mark.parametrize("stop", ["wörld", "d!", "emoji 🙂", "never there"])
def test_a_batch_of_tokens_stops_where_the_same_tokens_one_by_one_stop(tokenizer, stop: str, batch_size: int):
    """A coalesced message (several tokens) ends the text, and the tokens kept, exactly where the same
    tokens pushed one by one would."""
    token_ids = tokenizer(
        "Hello wörld! Ünïcödé, emoji 🙂 and spaces   end.", add_special_tokens=False
    ).input_ids
    one_by_one, expected_text, num_expected = TextStream(tokenizer, [stop, "zzz"]), [], 0
    for t in token_ids:
        expected_text.append(one_by_one.push([t]))
        num_expected += 1
        if one_by_one.is_stopped:
            break
    expected_text.append(one_by_one.finish())
    batched, text, num_taken = TextStream(tokenizer, [stop, "zzz"]), [], 0
    for start in range(0, len(token_ids), batch_size):
        batch = token_ids[start : start + batch_size]
        delta, taken = batched.push_until_stop(batch)
        text.append(delta)
        num_taken += taken
        if batched.is_stopped:
            assert taken <= len(batch)
            break
        assert taken == len(batch)
    text.append(batched.finish())
    assert "".join(text) == "".join(expected_text) and num_taken == num_expected
    assert batched.is_stopped == one_by_one.is_stopped


def policy_context(
    per_replica: dict[str, float], current: int = 2, target: int = 2, waiting: float = 0.0
) -> SimpleNamespace:
    return SimpleNamespace(
        current_num_replicas=current,
        target_num_replicas=target,
        total_num_requests=waiting,
        policy_state={},
        aggregated_metrics={OUTSTANDING_TOKENS_METRIC: per_replica} if per_replica else {},
    )


def test_policy_scales_with_predicted_outstanding_tokens_not_request_counts() -> None:
    policy = PredictedTokensPolicy(target_outstanding_tokens=1000)
    assert policy(policy_context({"a": 1500.0, "b": 1500.0}))[0] == 3.0
    assert policy(policy_context({"a": 100.0, "b": 50.0}))[0] == 0.15  # Serve rounds up and bounds it
    assert policy(policy_context({"a": 0.0, "b": 0.0}))[0] == 0.0
    assert policy(policy_context({}, current=2, target=3))[0] == 3.0  # no reports yet: hold the target
    assert policy(policy_context({"a": 5.0}, current=0, target=1))[0] == 1.0


def test_a_pool_scaled_to_zero_comes_back_when_requests_wait() -> None:
    policy = PredictedTokensPolicy(target_outstanding_tokens=1000)
    assert policy(policy_context({}, current=0, target=0, waiting=3.0))[0] == 1.0  # requests in the handles
    assert policy(policy_context({}, current=0, target=0, waiting=0.0))[0] == 0.0  # idle: stay at zero
    # A request past its predicted length reports no tokens: it still keeps one replica, never zero.
    assert policy(policy_context({"a": 0.0, "b": 0.0}, waiting=1.0))[0] == 1.0


# ---- the cluster --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    address: str
    """HOST:PORT of the gRPC proxy."""
    http_url: str
    """Base URL of the HTTP proxy (the OpenAI API under /v1)."""
    model_dir: str

    def pool(self, pool_id: int):
        from ray import serve

        from cluster.app import pool_name

        return serve.get_deployment_handle(pool_name(pool_id), app_name=APP_NAME)

    def stats(self, pool_id: int):
        return self.pool(pool_id).stats.remote().result()

    async def stats_async(self, pool_id: int):
        return await self.pool(pool_id).stats.remote()


@contextlib.contextmanager
def serving(model_dir: str, configure: Callable[[dict], None] = lambda raw: None) -> Iterator[Cluster]:
    """deploy/serve-local.yaml made small, on loopback and free ports, the way ``binserve serve`` deploys
    it; ``configure`` edits the raw Serve config first. Everything is shut down afterwards."""
    import ray
    from ray import serve
    from ray.serve._private.constants import SERVE_NAMESPACE
    from ray.serve.schema import ServeDeploySchema

    from cluster.local import deploy, free_port

    raw = yaml.safe_load(SERVE_LOCAL.read_text())
    grpc_port, http_port = free_port(), free_port()
    raw["http_options"] = {"host": "127.0.0.1", "port": http_port}
    raw["grpc_options"]["port"] = grpc_port
    args = raw["applications"][0]["args"]
    args["model"]["model_dir"] = model_dir
    args["model"]["max_model_len"] = 4096
    args["cache"]["kv_cache_bytes"] = 8 * 2**20
    # One stage per replica here (the pipeline has its own tests; two would need six logical CPUs), and a
    # small batch so requests queue and SSJF decides who goes next.
    args["parallel"]["pp_size"] = 1
    args["scheduler"].update(max_num_seqs=4, chunk_size=64)
    args["pools"].update(max_queued_requests=MAX_QUEUED_REQUESTS, num_cpus=0.5)
    args["ingress"].update(max_output_tokens=MAX_OUTPUT_TOKENS, max_messages=MAX_MESSAGES)
    configure(raw)
    ray.init(
        address="local", num_cpus=4, include_dashboard=False, namespace=SERVE_NAMESPACE, log_to_driver=False
    )
    try:
        deploy(ServeDeploySchema.model_validate(raw), timeout_s=300)
        yield Cluster(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", model_dir)
    finally:
        serve.shutdown()
        ray.shutdown()


STREAM_INTERVAL_S = 0.1
"""The shared cluster coalesces: each streamed message carries every token made in 0.1 s (dozens with the
tiny model), so every test of it (here and in tests/test_openai_api.py) also checks that coalesced streams
keep the exact semantics."""


def coalescing(raw: dict) -> None:
    raw["applications"][0]["args"]["pools"]["stream_interval_s"] = STREAM_INTERVAL_S


@pytest.fixture(scope="module")
def cluster(shared_cluster: Cluster) -> Cluster:
    return shared_cluster


def one_by_one(tokenizer, token_ids: list[int], stop: list[str]) -> tuple[str, list[int]]:
    """What a stream of one token per message answers: the text, and the tokens up to the one that
    completes a stop string."""
    text, pieces, kept = TextStream(tokenizer, stop), [], []
    for t in token_ids:
        pieces.append(text.push([t]))
        kept.append(t)
        if text.is_stopped:
            break
    return "".join(pieces) + text.finish(), kept


@pytest.fixture(scope="module")
def offline_greedy(tiny_llama: str) -> list[list[int]]:
    from pipeline.config import EngineConfig, ModelConfig
    from workers.llm import LLM

    llm = LLM(EngineConfig(ModelConfig(tiny_llama)))
    done = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS))
    return [list(d.completion.output_token_ids) for d in done]


def run(coro):
    return asyncio.run(coro)


async def call(address: str, request: pb.GenerateRequest, stream: bool, timeout_s: float | None = 120.0):
    async with GenerationClient(address) as client:
        return (await client.generate_timed(request, stream=stream, timeout_s=timeout_s)).response


def test_model_info_describes_the_bins_and_pools(cluster: Cluster) -> None:
    async def main():
        async with GenerationClient(cluster.address) as client:
            return await client.model_info()

    info = run(main())
    assert info.num_bins == 2 and len(info.bin_boundaries) == 1 and list(info.pool_of_bin) == [0, 1]
    assert info.queue_order == "ssjf" and info.scheduler_policy == "sarathi" and info.max_model_len == 4096


def test_unary_and_streaming_calls_give_the_offline_engines_greedy_tokens(
    cluster: Cluster, offline_greedy: list[list[int]], tokenizer
) -> None:
    async def main():
        requests = [make_request(p, max_tokens=MAX_TOKENS) for p in PROMPTS]
        unary = [call(cluster.address, r, stream=False) for r in requests]
        streamed = [call(cluster.address, r, stream=True) for r in requests]
        return await asyncio.gather(*unary, *streamed)

    responses = run(main())
    for i, response in enumerate(responses):
        expected = offline_greedy[i % len(PROMPTS)]
        assert list(response.token_ids) == expected, PROMPTS[i % len(PROMPTS)]
        assert response.text == tokenizer.decode(expected, skip_special_tokens=True)
        assert response.usage.num_output_tokens == len(expected)
        assert response.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
        assert 0 < response.ttft_s <= response.total_s


def test_requests_are_served_by_the_pool_of_their_predicted_bin(cluster: Cluster) -> None:
    from cluster.router import BinRouter

    async def main():
        async with GenerationClient(cluster.address) as client:
            info = await client.model_info()
            replies = await asyncio.gather(*(client.generate(make_request(p, max_tokens=4)) for p in PROMPTS))
            return info, replies

    before = [cluster.stats(p).num_requests_by_bin for p in (0, 1)]
    info, replies = run(main())
    after = [cluster.stats(p).num_requests_by_bin for p in (0, 1)]
    router = BinRouter(tuple(info.bin_boundaries), tuple(info.pool_of_bin))
    sent_per_bin = {0: 0, 1: 0}
    for reply in replies:
        assert reply.bin == router.bin_of(reply.predicted_output_tokens)
        sent_per_bin[reply.bin] += 1
    for pool_id in (0, 1):
        served = {b: after[pool_id].get(b, 0) - before[pool_id].get(b, 0) for b in (0, 1)}
        # Each pool served exactly the requests of its own bin, and none of the other's.
        assert served == {b: sent_per_bin[b] if router.pool_of_bin[b] == pool_id else 0 for b in (0, 1)}
    assert all(n > 0 for n in sent_per_bin.values()), f"the prompts all fell in one bin: {sent_per_bin}"


def test_inside_a_replica_shorter_predicted_jobs_are_served_first(cluster: Cluster, tokenizer) -> None:
    from pipeline.request import NewRequest

    pool = cluster.pool(0).options(stream=True)
    prompt = tuple(tokenizer("Tell me something").input_ids)

    def request(name: str, predicted: int, max_tokens: int) -> NewRequest:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        return NewRequest(f"ssjf-{name}-{time.monotonic_ns()}", prompt, params, predicted, 0)

    async def finish(responses, started: asyncio.Event | None = None) -> object:
        async for output in responses:
            if started is not None:
                started.set()  # it produced a token: it holds a running slot
            if output.finish_reason is not None:
                return output.metrics

    async def main():
        stats = cluster.pool(0)
        # Fill every running slot (max_num_seqs = 4) with long jobs, so the next ones queue behind them.
        blockers = [pool.generate.remote(request(f"b{i}", 500, 500)) for i in range(4)]
        started = [asyncio.Event() for _ in blockers]
        blocker_tasks = [asyncio.create_task(finish(b, e)) for b, e in zip(blockers, started, strict=True)]
        await asyncio.gather(*(e.wait() for e in started))
        predicted = [50, 10, 40, 20, 60, 30]  # arrival order is not length order
        queued = [
            asyncio.create_task(finish(pool.generate.remote(request(f"q{p}", p, 4)))) for p in predicted
        ]
        while (await stats.stats.remote()).num_unfinished_requests < len(blockers) + len(predicted):
            await asyncio.sleep(0.01)
        # Everyone is queued: free the slots at once and let the scheduler pick.
        for blocker in blockers:
            blocker.cancel()
        await asyncio.gather(*blocker_tasks, return_exceptions=True)
        return predicted, await asyncio.gather(*queued)

    predicted, metrics = run(main())
    admitted_s = dict(zip(predicted, (m.admitted_s for m in metrics), strict=True))
    # Admission follows the predicted length, shortest first, whatever order the requests came in: no
    # job is admitted before a shorter one (jobs admitted in the same step share a time).
    for shorter in predicted:
        for longer in predicted:
            if shorter < longer:
                assert admitted_s[shorter] <= admitted_s[longer], (shorter, longer, admitted_s)
    assert len(set(admitted_s.values())) > 1  # the queue really was ordered, not admitted all at once


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(prompt=""), r"prompt, messages: exactly one of them must be given, got neither"),
        (dict(max_tokens=0), r"max_tokens: must be in \[1, 3000\], got 0"),
        (dict(max_tokens=3001), r"max_tokens: must be in \[1, 3000\], got 3001"),
        (dict(top_p=2.0), r"top_p: must be in \(0, 1\], got 2.0"),
        (dict(temperature=-1.0), r"temperature: must be in \[0.0, 2.0\], got -1.0"),
        (dict(top_k=-2), r"top_k: must be in \[0, inf\], got -2"),
        (dict(stop=[""]), r"stop\[0\]: must be a non-empty string"),
        (dict(prompt="word " * 5000), r"prompt: \d+ tokens, must be at most 4095"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(
    cluster: Cluster, stream: bool, fields: dict, message: str
) -> None:
    request = make_request(**{"prompt": "Hello", "max_tokens": 4, **fields})
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        run(call(cluster.address, request, stream=stream))
    assert failure.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, failure.value.details()), failure.value.details()


def wait_until_idle(cluster: Cluster, timeout_s: float = 30.0) -> list:
    deadline_s = time.monotonic() + timeout_s
    while True:
        stats = [cluster.stats(p) for p in (0, 1)]
        if all(s.num_unfinished_requests == 0 for s in stats) or time.monotonic() > deadline_s:
            return stats
        time.sleep(0.05)


def assert_no_kv_block_allocated(stats: list) -> None:
    for s in stats:
        assert s.num_unfinished_requests == 0
        assert s.num_free_kv_blocks == s.num_kv_blocks, f"pool {s.pool_id} holds KV blocks"


def num_cancelled(cluster: Cluster) -> int:
    return sum(cluster.stats(p).num_cancelled_requests for p in (0, 1))


# Long enough that a request still runs when the test cancels it (the model's context is 4096).
LONG = dict(max_tokens=1024, ignore_eos=True)


def num_accepted(cluster: Cluster) -> int:
    return sum(sum(cluster.stats(p).num_requests_by_bin.values()) for p in (0, 1))


# Ray Serve 2.60's gRPC proxy loses a stream's cancellation when it lands while the proxy is handing a
# message to gRPC (the proxy's generators are then closed without cancelling the replica call), so a
# cancelled or timed-out *stream* occasionally runs to its end before its blocks are freed. The tests
# through gRPC therefore check that no block stays allocated; the abort itself is checked where the
# cancellation is delivered: a unary call, and a stream cancelled at the ingress's handle.
IDLE_TIMEOUT_S = 90.0


def test_a_cancelled_stream_frees_its_kv_blocks(cluster: Cluster) -> None:
    async def main():
        async with GenerationClient(cluster.address) as client:
            call = client.generate_stream(make_request("Tell me a very long story.", **LONG))
            messages = [await call.read() for _ in range(3)]
            held = [await cluster.stats_async(p) for p in (0, 1)]
            call.cancel()
            return messages, held

    messages, held = run(main())
    assert all(m.token_ids for m in messages)
    assert sum(s.outstanding_predicted_tokens for s in held) > 0  # the autoscaling signal saw it
    assert sum(s.num_kv_blocks - s.num_free_kv_blocks for s in held) > 0
    assert_no_kv_block_allocated(wait_until_idle(cluster, IDLE_TIMEOUT_S))


def test_a_stream_cancelled_at_the_ingress_aborts_its_engine_request(cluster: Cluster) -> None:
    from ray import serve

    from cluster.app import INGRESS_NAME

    cancelled_before = num_cancelled(cluster)
    ingress = serve.get_deployment_handle(INGRESS_NAME, app_name=APP_NAME).options(stream=True)

    async def main():
        # What Serve's proxy does with a gRPC call, then what it does when the call is cancelled.
        responses = ingress.GenerateStream.remote(make_request("Tell me a very long story.", **LONG))
        messages = [await responses.__anext__() for _ in range(3)]
        responses.cancel()
        return messages

    assert all(m.token_ids for m in run(main()))
    assert_no_kv_block_allocated(wait_until_idle(cluster))
    assert num_cancelled(cluster) == cancelled_before + 1  # aborted, not run to its end


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_an_expired_deadline_frees_its_kv_blocks(cluster: Cluster, stream: bool) -> None:
    cancelled_before, accepted_before = num_cancelled(cluster), num_accepted(cluster)
    # 3,000 tokens take the tiny model many seconds: the deadline comes while it generates.
    request = make_request("Tell me a very long story.", max_tokens=MAX_OUTPUT_TOKENS, ignore_eos=True)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        run(call(cluster.address, request, stream, timeout_s=3.0))
    assert failure.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED, failure.value.details()
    stats = wait_until_idle(cluster, IDLE_TIMEOUT_S)
    assert_no_kv_block_allocated(stats)
    if not stream and num_accepted(cluster) > accepted_before:  # it reached an engine in time ...
        assert num_cancelled(cluster) == cancelled_before + 1, f"the engine did not abort it: {stats}"


def test_a_stop_string_ends_the_text_and_the_request(cluster: Cluster, offline_greedy, tokenizer) -> None:
    full_text = tokenizer.decode(offline_greedy[1], skip_special_tokens=True)
    stop = full_text[len(full_text) // 2 : len(full_text) // 2 + 3]
    reply = run(
        call(cluster.address, make_request(PROMPTS[1], max_tokens=MAX_TOKENS, stop=[stop]), stream=True)
    )
    assert reply.text == full_text.split(stop)[0]
    assert reply.finish_reason == pb.FINISH_REASON_STOP
    assert_no_kv_block_allocated(wait_until_idle(cluster))


def test_coalesced_streams_answer_what_one_token_per_message_answers(cluster: Cluster, tokenizer) -> None:
    prompts = PROMPTS[:4]

    async def answers(stops: list[list[str]]):
        async with GenerationClient(cluster.address) as client:

            async def streamed(request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
                return [m async for m in client.generate_stream(request)]

            requests = [
                make_request(p, max_tokens=40, ignore_eos=True, stop=s)
                for p, s in zip(prompts, stops, strict=True)
            ]
            unary = [client.generate(r) for r in requests]
            return await asyncio.gather(*unary), await asyncio.gather(*(streamed(r) for r in requests))

    full, _ = run(answers([[]] * len(prompts)))
    # A stop string from the middle of each answer: it falls inside a message of several tokens.
    texts = [tokenizer.decode(list(r.token_ids), skip_special_tokens=True) for r in full]
    stops = [[t[len(t) // 2 : len(t) // 2 + 3]] for t in texts]
    unary, streams = run(answers(stops))
    for response, messages, whole, stop in zip(unary, streams, full, stops, strict=True):
        text, kept = one_by_one(tokenizer, list(whole.token_ids), stop)
        assert [t for m in messages for t in m.token_ids] == list(response.token_ids) == kept
        assert "".join(m.text for m in messages) == response.text == text
        assert messages[-1].finish_reason == response.finish_reason == pb.FINISH_REASON_STOP
        assert messages[-1].usage.num_output_tokens == response.usage.num_output_tokens == len(kept)
        assert messages[-1].usage.num_prompt_tokens == whole.usage.num_prompt_tokens
    # Coalesced: fewer messages than tokens, and some stop string completed inside a message of several.
    assert sum(len(m) for m in streams) < sum(len(r.token_ids) for r in unary)
    assert any(len(m[-1].token_ids) > 1 for m in streams)
    assert_no_kv_block_allocated(wait_until_idle(cluster))


def test_a_full_queue_is_resource_exhausted(cluster: Cluster) -> None:
    async def one(client: GenerationClient) -> grpc.StatusCode:
        try:
            await client.generate(make_request("Tell me a very long story.", **LONG))
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    async def main():
        async with GenerationClient(cluster.address) as client:
            return await first_codes(lambda: one(client), 3 * MAX_QUEUED_REQUESTS)

    codes = run(main())
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert_no_kv_block_allocated(wait_until_idle(cluster))


def test_the_client_command_prints_json(cluster: Cluster, offline_greedy, capsys) -> None:
    import argparse
    import json

    from tools import serve_cli

    parser = argparse.ArgumentParser()
    serve_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "client",
            "generate",
            "--address",
            cluster.address,
            "--prompt",
            PROMPTS[0],
            "--max-tokens",
            "20",
            "--json",
        ]
    )
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["token_ids"] == offline_greedy[0] and result["bin"] in (0, 1)


def test_the_proxy_offers_server_reflection(cluster: Cluster) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(cluster.address) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "binserve.v1.Generation" in services  # grpcurl and grpcui can discover the API


# ---- chat over gRPC -------------------------------------------------------------------------------------

CONVERSATION = [
    ("system", "You are terse."),
    ("user", "Hi!"),
    ("assistant", "Hello."),
    ("user", "Name a prime."),
]


def test_model_info_says_the_model_has_a_chat_template_and_its_defaults(cluster: Cluster) -> None:
    async def main():
        async with GenerationClient(cluster.address) as client:
            return await client.model_info()

    info = run(main())
    assert info.has_chat_template
    # The tiny model has no generation_config.json: greedy, no penalty; max_tokens up to the context.
    defaults = info.sampling_defaults
    assert (defaults.temperature, defaults.top_p, defaults.repetition_penalty, defaults.max_tokens) == (
        0.0,
        1.0,
        1.0,
        0,
    )


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_messages_are_answered_as_the_rendered_prompt(cluster: Cluster, tokenizer, stream: bool) -> None:
    from pipeline.chat import render_chat
    from workers.checkpoint import load_tokenizer

    rendered = render_chat(load_tokenizer(cluster.model_dir), [ChatMessage(*m) for m in CONVERSATION])
    assert rendered.endswith("<|im_start|>assistant\n")

    async def main():
        chat = make_request(messages=CONVERSATION, max_tokens=MAX_TOKENS, temperature=0.0)
        plain = make_request(rendered, max_tokens=MAX_TOKENS, temperature=0.0)
        return await asyncio.gather(call(cluster.address, chat, stream), call(cluster.address, plain, stream))

    chat, plain = run(main())
    assert list(chat.token_ids) == list(plain.token_ids) and chat.text == plain.text
    assert chat.usage.num_prompt_tokens == len(tokenizer(rendered, add_special_tokens=False).input_ids)
    assert chat.usage.num_output_tokens == len(chat.token_ids) > 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(prompt="hi", messages=[("user", "hi")]), r"prompt, messages: exactly one .* got both"),
        (
            dict(messages=[("user", "hi"), ("robot", "x")]),
            r"messages\[1\]\.role: must be one of system, user",
        ),
        (dict(messages=[("user", "")]), r"messages\[0\]\.content: must be a non-empty string"),
        (dict(messages=[("user", "hi")] * 9), r"messages: must hold 1 to 8 messages, got 9"),
        (
            dict(messages=[("user", "word " * 5000)]),
            r"messages: the rendered prompt is \d+ tokens, must be at most 4095 \(max_model_len 4096",
        ),
    ],
)
def test_bad_chat_input_is_invalid_argument_and_others_are_still_served(
    cluster: Cluster, offline_greedy, fields: dict, message: str
) -> None:
    async def bad():
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call(cluster.address, make_request(**{"max_tokens": 4, **fields}), stream=True)
        return failure.value

    async def main():
        good = make_request(PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0.0)
        return await asyncio.gather(bad(), call(cluster.address, good, stream=True), bad())

    first, good, second = run(main())
    for failure in (first, second):
        assert failure.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert re.search(message, failure.details()), failure.details()
    assert list(good.token_ids) == offline_greedy[0]
