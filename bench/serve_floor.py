"""Ray Serve's own floor: the same two streaming hops as binserve's path with nothing of binserve in them.
Benchmarks only (``deploy/bench-serve-floor.yaml``, ``binserve bench path --config ...``).

    client -> Serve's gRPC / HTTP proxy -> ``ingress`` (a Serve replica) -> ``engine-pool-0`` (a Serve replica)

The pool replica gives every request one token per ``step_s`` from a single ticker task and streams,
per request, every token made since its previous message (binserve's coalescing, without an engine,
scheduler, metrics or caller watch); the ingress turns each message into a ``GenerateResponse`` or one
OpenAI-shaped SSE event (no intake, predictor, router, detokenization or stop strings). What it costs per
streamed token is what Serve's proxy, its handle streams and its replicas cost on this machine: the least
any application built this way can cost, and the yardstick for binserve's own figures.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve

from bench.path_runner import FIRST_TOKEN_ID

INGRESS_NAME = "ingress"
POOL_NAME = "engine-pool-0"
"""The names of binserve's own deployments, so ``binserve bench path`` finds the same processes."""


class _Tokens:
    """One request's tokens made (by the ticker thread) but not yet streamed (on the replica's loop)."""

    def __init__(self, max_tokens: int, loop: asyncio.AbstractEventLoop) -> None:
        self.max_tokens = max_tokens
        self.loop = loop
        self.num_made = 0
        self.num_sent = 0
        self.ready = asyncio.Event()

    def take(self) -> tuple[int, ...]:
        self.ready.clear()
        start, self.num_sent = self.num_sent, self.num_made
        return tuple(range(FIRST_TOKEN_ID + start, FIRST_TOKEN_ID + self.num_sent))


def _wake(requests: list[_Tokens]) -> None:
    for tokens in requests:
        tokens.ready.set()


@serve.deployment
class FloorPool:
    def __init__(self, step_s: float) -> None:
        """A thread makes one token per request every ``step_s`` and wakes the callers, as binserve's
        engine driver does (``pipeline/driver.py``), so a caller that falls behind takes several at once."""
        self.step_s = step_s
        self.lock = threading.Lock()
        self.requests: set[_Tokens] = set()
        self.stopped = False
        threading.Thread(target=self._tick, name="floor-ticker", daemon=True).start()

    def _tick(self) -> None:
        while not self.stopped:
            time.sleep(self.step_s)
            to_wake: dict[asyncio.AbstractEventLoop, list[_Tokens]] = {}
            with self.lock:
                for tokens in self.requests:
                    if tokens.num_made < tokens.max_tokens:
                        tokens.num_made += 1
                        if tokens.num_made == tokens.num_sent + 1:  # it had nothing waiting
                            to_wake.setdefault(tokens.loop, []).append(tokens)
            for loop, requests in to_wake.items():
                loop.call_soon_threadsafe(_wake, requests)

    async def generate(self, max_tokens: int) -> AsyncIterator[tuple[int, ...]]:
        """Every token made since the previous message; the last message ends the stream."""
        tokens = _Tokens(max_tokens, asyncio.get_running_loop())
        with self.lock:
            self.requests.add(tokens)
        try:
            while tokens.num_sent < max_tokens:
                await tokens.ready.wait()
                with self.lock:
                    token_ids = tokens.take()
                yield token_ids
        finally:
            with self.lock:
                self.requests.discard(tokens)

    def __del__(self) -> None:
        self.stopped = True


def _build_http(ingress: FloorIngress) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        max_tokens = int((await request.json())["max_tokens"])

        async def events() -> AsyncIterator[str]:
            async for token_ids in ingress.pool.generate.remote(max_tokens):
                chunk = {"object": "text_completion", "choices": [{"index": 0, "text": "", "logprobs": None}]}
                chunk["choices"][0]["token_ids"] = list(token_ids)
                yield f"data: {json.dumps(chunk)}\n\n"
            usage = {"prompt_tokens": 1, "completion_tokens": max_tokens, "total_tokens": max_tokens + 1}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@serve.deployment
@serve.ingress()
class FloorIngress:
    def __init__(self, pool) -> None:
        self.pool = pool.options(stream=True)

    def __serve_build_asgi_app__(self):  # Serve calls it once, after __init__
        return _build_http(self)

    async def GenerateStream(self, request, grpc_context=None):  # noqa: N802 (named like the RPC)
        from proto.binserve.v1 import generation_pb2 as pb

        num_sent = 0
        async for token_ids in self.pool.generate.remote(request.max_tokens):
            num_sent += len(token_ids)
            message = pb.GenerateResponse(request_id=request.request_id, token_ids=token_ids)
            if num_sent == request.max_tokens:
                message.finish_reason = pb.FINISH_REASON_LENGTH
                message.usage.num_output_tokens = num_sent
            yield message


def build_app(args: dict[str, Any]):  # -> ray.serve.Application
    """``import_path: bench.serve_floor:build_app``; ``args``: ``path_runner.step_s`` and the ``pools`` and
    ``ingress`` sections' ``num_cpus`` and ``max_queued_requests`` (other sections are ignored)."""
    step_s = float(args["path_runner"]["step_s"])
    pools, ingress = args.get("pools", {}), args.get("ingress", {})
    max_ongoing = int(pools.get("max_queued_requests", 512))
    from cluster.app import replica_runtime_env  # Serve as binserve configures its replicas

    runtime_env = replica_runtime_env()
    pool = FloorPool.options(
        name=POOL_NAME,
        ray_actor_options={"num_cpus": pools.get("num_cpus", 0.5), "runtime_env": runtime_env},
        max_ongoing_requests=max_ongoing,
    ).bind(step_s)
    return FloorIngress.options(
        name=INGRESS_NAME,
        ray_actor_options={"num_cpus": ingress.get("num_cpus", 0.5), "runtime_env": runtime_env},
        max_ongoing_requests=max_ongoing,
    ).bind(pool)
