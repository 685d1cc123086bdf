"""One request's path after intake, shared by both APIs: predict, route, stream the engine's tokens back.

    service = GenerationService(intake, predictor, router, pools)
    async for chunk in service.generate(GenerationInput(prompt="Hello", max_tokens=8)):
        chunk.text, chunk.token_ids          # the new text and tokens; the last chunk has finish_reason
        chunk.final                          # usage and timings, on the last chunk only

    predict the output length (the ingress's own encoder, batched; it starts first) while the intake
    checks, renders and tokenizes -> route: length -> bin -> engine pool -> detokenize, cut at stop strings

The gRPC methods and the HTTP routes each translate these chunks into their wire format, so the two
APIs give the same text for the same request. Leaving the iteration early (a stop string, a cancelled
call, a client that disconnects) cancels the engine call, which aborts the request and frees its KV
blocks.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from ray.serve.handle import DeploymentHandle

from cluster.intake import GenerationInput, Intake
from cluster.predictor.distribution import DistributionTable
from cluster.predictor_client import PredictorClient
from cluster.prometheus import IngressMetrics
from cluster.router import BinRouter, PrefixPools
from cluster.text_stream import TextStream
from pipeline.block_manager import prompt_block_names
from pipeline.chat import predictor_text
from pipeline.driver import QueueFullError
from pipeline.request import FinishReason, NewRequest


def early_predictor_text(request: GenerationInput, max_chars: int) -> str | None:
    """``PreparedRequest.predictor_text`` before the intake has checked the request; None where the intake
    will refuse it (or the text is too long to hand to the encoder unchecked)."""
    if request.messages is None:
        text = request.prompt
    else:
        text = predictor_text(request.messages) if request.messages else None
    return text if text and len(text) <= max_chars else None


@dataclass(frozen=True)
class Routing:
    """Where the request went, on every chunk."""

    request_id: str
    predicted_output_tokens: int
    """The length predictor's estimate of the output, which chose the bin (the engine counts it capped at
    ``max_tokens``)."""
    bin_id: int
    """The bin that estimate fell in; the router sent the request to a pool serving it."""


@dataclass(frozen=True)
class FinalStats:
    num_prompt_tokens: int
    num_output_tokens: int
    ttft_s: float
    """Seconds from the ingress receiving the request to its first output token."""
    total_s: float
    predict_s: float
    """Seconds spent waiting for the length prediction."""
    num_cached_prompt_tokens: int = 0
    """Prompt tokens whose KV the engine found in its prefix cache."""


@dataclass(frozen=True)
class GenerationChunk:
    text: str
    """The text the new tokens release (possibly empty while a stop string or a character is pending)."""
    token_ids: tuple[int, ...]
    routing: Routing
    finish_reason: FinishReason | None = None
    final: FinalStats | None = None
    """Set on the last chunk, with ``finish_reason``."""


class GenerationService:
    def __init__(
        self,
        intake: Intake,
        predictor: PredictorClient,
        router: BinRouter,
        pools: Sequence[DeploymentHandle],
        metrics: IngressMetrics | None = None,
        max_admitted_requests: int | None = None,
        caller: Any | None = None,
        block_size: int | None = None,
        length_distribution: DistributionTable | None = None,
    ) -> None:
        """``max_admitted_requests``: requests held at once; more are refused (``QueueFullError``).
        ``caller``: the actor handle of the replica this service runs in, sent with every engine call so
        that the engine aborts the calls of a caller that dies (``cluster/caller_watch.py``).
        ``block_size``: the engines' KV block size, to name each prompt's blocks once for the replica
        router (``NewRequest.prompt_block_names``); None when prefix caching is off.
        ``length_distribution``: the predictor's error table, to send each request its predicted length
        distribution (``NewRequest.output_length_distribution``: the replica router counts its mean, the
        ``expected_remaining`` order ranks by it)."""
        if len(pools) != router.num_pools:
            raise ValueError(f"pools: {len(pools)} engine pools given, the router needs {router.num_pools}")
        self.intake = intake
        self.predictor = predictor
        self.router = router
        self.pools = [pool.options(stream=True) for pool in pools]
        self.metrics = metrics
        self.max_admitted_requests = max_admitted_requests
        self.num_admitted = 0
        self.caller = caller
        self.block_size = block_size
        self.length_distribution = length_distribution
        self.prefix_pools = PrefixPools()  # where this ingress sent each prompt block (several pools)

    async def generate(self, request: GenerationInput) -> AsyncIterator[GenerationChunk]:
        """The request's chunks; the last carries the finish reason, usage and timings. Bad input raises
        ``ValueError`` before anything is predicted; engine failures raise from the first chunk on."""
        if self.max_admitted_requests is not None and self.num_admitted >= self.max_admitted_requests:
            # Shed load at once: a burst beyond what the pools can queue would otherwise wait unbounded
            # in front of the predictor and the pools' handles.
            raise QueueFullError(f"ingress: {self.num_admitted} requests in flight, the most it admits")
        self.num_admitted += 1  # one event loop: no lock needed
        try:
            # Closed explicitly when the caller leaves early, so the engine request is aborted now.
            async with aclosing(self._generate(request)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self.num_admitted -= 1

    async def _generate(self, request: GenerationInput) -> AsyncIterator[GenerationChunk]:
        arrival_s = time.perf_counter()
        # The encoder starts on the prompt first and reads it while the intake checks, renders and
        # tokenizes it, so the two cost about the longer of them, not their sum.
        text = early_predictor_text(request, self.intake.limits.max_prompt_chars)
        prediction = None if text is None else self.predictor.predict(text)
        try:
            prepared = self.intake.prepare(request)
        except BaseException:
            if prediction is not None:
                prediction.cancel()
            raise
        predict_start_s = time.perf_counter()
        if prediction is None:
            prediction = self.predictor.predict(prepared.predictor_text)
        predicted_output_tokens = await prediction
        predict_s = time.perf_counter() - predict_start_s
        if self.metrics is not None:
            self.metrics.observe_prediction(predict_s)
        block_names = (
            () if self.block_size is None else prompt_block_names(prepared.prompt_token_ids, self.block_size)
        )
        route = self.router.route(
            predicted_output_tokens, self.prefix_pools.held(block_names, self.block_size)
        )
        if self.router.num_pools > 1:
            self.prefix_pools.record(block_names, route.pool_id)
        routing = Routing(prepared.request_id or uuid.uuid4().hex, predicted_output_tokens, route.bin_id)
        text = TextStream(self.intake.tokenizer, prepared.stop)
        outputs = self.pools[route.pool_id].generate.remote(
            NewRequest(
                routing.request_id,
                prepared.prompt_token_ids,
                prepared.params,
                # The engine's work estimates (SSJF, the replica router, the autoscaler): an answer cannot
                # outrun its max_tokens. The bin keeps the predictor's own estimate: bins are equal-mass
                # over uncapped lengths, and capped estimates would crowd every request with a max_tokens
                # under the first boundary into the first pool (`make demo`: all 16, pool 1 idle).
                min(predicted_output_tokens, prepared.params.max_tokens),
                route.bin_id,
                block_names,
                None
                if self.length_distribution is None
                else self.length_distribution.for_prediction(
                    predicted_output_tokens, prepared.params.max_tokens
                ),
            ),
            self.caller,
        )
        first_token_s: float | None = None
        is_engine_done = False
        try:
            async for output in outputs:
                # One message of the replica: every token of the request since its previous message.
                first_token_s = first_token_s or time.perf_counter()
                is_engine_done = output.finish_reason is not None
                token_ids = output.new_token_ids
                delta, num_taken = text.push_until_stop(token_ids)
                num_dropped = len(token_ids) - num_taken  # made after a stop string ended the text
                if num_dropped:
                    token_ids = token_ids[:num_taken]
                if is_engine_done:
                    delta += text.finish()
                finish_reason = FinishReason.STOP if text.is_stopped else output.finish_reason
                if finish_reason is None:
                    yield GenerationChunk(delta, token_ids, routing)
                    continue
                final = FinalStats(
                    num_prompt_tokens=len(prepared.prompt_token_ids),
                    num_output_tokens=output.num_output_tokens - num_dropped,
                    ttft_s=first_token_s - arrival_s,
                    total_s=time.perf_counter() - arrival_s,
                    predict_s=predict_s,
                    num_cached_prompt_tokens=output.num_cached_tokens,
                )
                yield GenerationChunk(delta, token_ids, routing, finish_reason, final)
                return
        finally:
            if not is_engine_done:
                outputs.cancel()  # a stop string, a cancelled call or a disconnect: abort, free the blocks
