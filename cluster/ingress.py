"""The gRPC ingress: ``binserve.v1.Generation`` as a Ray Serve deployment.

Serve's gRPC proxy (``grpc_options.grpc_servicer_functions`` names
``proto.binserve.v1.generation_pb2_grpc.add_GenerationServicer_to_server``) calls the ingress method named
like the RPC with the request proto and a ``RayServegRPCContext``; a streaming RPC's method is an async
generator. A request's path:

    validate (INVALID_ARGUMENT naming the field) -> tokenize -> predict its output length (the global
    predictor deployment, batched) -> route: length -> bin -> engine pool -> stream the pool's tokens back,
    detokenized, cutting at stop strings

A full engine queue is RESOURCE_EXHAUSTED and a dead engine UNAVAILABLE. A cancelled call or an expired
deadline cancels the method; its ``finally`` cancels the engine call, which aborts the request and frees
its KV blocks.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from cluster.config import AppConfig, IngressConfig
from cluster.router import BinRouter
from pipeline.config import check_range
from pipeline.driver import EngineDeadError, QueueFullError
from pipeline.request import FinishReason, NewRequest, SamplingParams
from proto.binserve.v1 import generation_pb2 as pb

DEFAULT_MAX_TOKENS = 16
_FINISH_REASONS = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}


def sampling_params_of(request: pb.GenerateRequest, limits: IngressConfig) -> SamplingParams:
    """Check a request's fields; ``ValueError`` names the first bad one and its allowed range."""
    if not request.prompt:
        raise ValueError("prompt: must be a non-empty string")
    max_tokens = request.max_tokens if request.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    check_range("max_tokens", max_tokens, 1, limits.max_output_tokens)
    top_p = request.top_p if request.HasField("top_p") else 1.0
    for name, value in (("temperature", request.temperature), ("top_p", top_p)):
        if not math.isfinite(value):
            raise ValueError(f"{name}: must be a finite number, got {value}")
    if len(request.stop) > limits.max_stop_strings:
        raise ValueError(f"stop: at most {limits.max_stop_strings} strings, got {len(request.stop)}")
    for i, stop in enumerate(request.stop):
        if not stop:
            raise ValueError(f"stop[{i}]: must be a non-empty string")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=top_p,
        top_k=request.top_k,
        seed=request.seed if request.HasField("seed") else None,
        ignore_eos=request.ignore_eos,
    )


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The gRPC status for a failure the caller can act on; ``None`` for a bug (INTERNAL)."""
    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    if isinstance(cause, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(cause)
    if isinstance(cause, QueueFullError | BackPressureError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(cause)
    if isinstance(cause, EngineDeadError):
        return grpc.StatusCode.UNAVAILABLE, str(cause)
    return None


class TextStream:
    """Output tokens in, final text out: incremental detokenization and stop strings.

    Each push decodes only a short window (the tokens since the last released word piece), so a long
    output costs O(n), not O(n^2). Text that might be the start of a stop string, or an incomplete UTF-8
    character, is held back until the next tokens settle it.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:  # a transformers tokenizer
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.token_ids: list[int] = []
        self.is_stopped = False
        self._decoded = ""  # released text, then held-back text
        self._num_released_chars = 0
        self._prefix_offset = 0  # token window whose text is already in _decoded: [prefix, read)
        self._read_offset = 0

    @property
    def text(self) -> str:
        return self._decoded[: self._num_released_chars]

    def push(self, new_token_ids: Sequence[int]) -> str:
        """Append tokens; return the text they release (possibly empty)."""
        self.token_ids.extend(new_token_ids)
        self._decoded += self._decode_new(is_final=False)
        return self._release(is_final=False)

    def finish(self) -> str:
        """No more tokens: release everything still held back (unless a stop string cut the text)."""
        self._decoded += self._decode_new(is_final=True)
        return self._release(is_final=True)

    def _decode_new(self, is_final: bool) -> str:
        if self.is_stopped:
            return ""
        decode = self.tokenizer.decode
        window = self.token_ids[self._prefix_offset :]
        prefix = decode(self.token_ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full = decode(window, skip_special_tokens=True)
        if full.endswith("\ufffd") and not is_final:
            return ""  # a multi-byte character split across tokens: wait for the rest
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        return full[len(prefix) :]

    def _release(self, is_final: bool) -> str:
        start = self._num_released_chars
        # Held-back text never contains a whole stop string, so a match starts at or after `start`.
        matches = [i for i in (self._decoded.find(s, start) for s in self.stop) if i >= 0]
        if matches and not self.is_stopped:
            self.is_stopped = True
            self._decoded = self._decoded[: min(matches)]
            end = len(self._decoded)
        elif is_final or self.is_stopped:
            end = len(self._decoded)
        else:
            end = len(self._decoded) - self._stop_prefix_len(self._decoded[start:])
        self._num_released_chars = end
        return self._decoded[start:end]

    def _stop_prefix_len(self, pending: str) -> int:
        """Length of the longest suffix of ``pending`` that begins some stop string."""
        return max(
            (
                k
                for s in self.stop
                for k in range(min(len(s) - 1, len(pending)), 0, -1)
                if pending.endswith(s[:k])
            ),
            default=0,
        )


@serve.deployment
class GenerationIngress:
    async def __init__(
        self, config: AppConfig, predictor: DeploymentHandle, pools: Sequence[DeploymentHandle]
    ) -> None:
        from workers.checkpoint import load_config, load_tokenizer

        self.config = config
        self.tokenizer = load_tokenizer(config.engine.model.model_dir)
        hf_config = load_config(config.engine.model.model_dir)
        self.max_model_len = config.engine.model.max_model_len or hf_config.max_position_embeddings
        self.vocab_size = hf_config.vocab_size
        self.predictor = predictor
        boundaries = await predictor.bin_boundaries.remote(config.router.num_bins)
        self.router = BinRouter.build(boundaries, config.router.resolved_num_pools)
        if len(pools) != self.router.num_pools:
            raise ValueError(
                f"pools: {len(pools)} engine pools given, the router needs {self.router.num_pools}"
            )
        self.pools = [pool.options(stream=True) for pool in pools]

    # ---- the RPCs -------------------------------------------------------------------------------------

    async def Generate(  # noqa: N802 (Serve calls the method named like the RPC)
        self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext | None = None
    ) -> pb.GenerateResponse:
        text, token_ids = [], []
        try:
            async for message in self._generate(request):
                text.append(message.text)
                token_ids.extend(message.token_ids)
        except Exception as exc:
            _set_status(exc, grpc_context)
            raise
        del message.token_ids[:]
        message.token_ids.extend(token_ids)
        message.text = "".join(text)
        return message

    async def GenerateStream(  # noqa: N802
        self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext | None = None
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            async for message in self._generate(request):
                yield message
        except Exception as exc:
            _set_status(exc, grpc_context)
            raise

    async def GetModelInfo(  # noqa: N802
        self, request: pb.ModelInfoRequest, grpc_context: RayServegRPCContext | None = None
    ) -> pb.ModelInfo:
        engine = self.config.engine
        return pb.ModelInfo(
            model=Path(engine.model.model_dir).name,
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            num_bins=self.router.num_bins,
            bin_boundaries=list(self.router.bin_boundaries),
            pool_of_bin=list(self.router.pool_of_bin),
            num_pools=self.router.num_pools,
            scheduler_policy=engine.scheduler.policy.value,
            queue_order=engine.scheduler.queue_order.value,
            chunk_size=engine.scheduler.chunk_size,
            pp_size=engine.parallel.pp_size,
        )

    # ---- one request's path -----------------------------------------------------------------------------

    async def _generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        """The stream of response messages; the last carries the finish reason, usage and timings."""
        arrival_s = time.perf_counter()
        params = sampling_params_of(request, self.config.ingress)
        prompt_token_ids = tuple(self.tokenizer(request.prompt).input_ids)
        predict_start_s = time.perf_counter()
        predicted_output_tokens = await self.predictor.predict.remote(request.prompt)
        predict_s = time.perf_counter() - predict_start_s
        route = self.router.route(predicted_output_tokens)
        request_id = request.request_id or uuid.uuid4().hex
        routing = dict(
            request_id=request_id, predicted_output_tokens=predicted_output_tokens, bin=route.bin_id
        )
        text = TextStream(self.tokenizer, request.stop)
        outputs = self.pools[route.pool_id].generate.remote(
            NewRequest(request_id, prompt_token_ids, params, predicted_output_tokens, route.bin_id)
        )
        first_token_s: float | None = None
        is_engine_done = False
        try:
            async for output in outputs:
                first_token_s = first_token_s or time.perf_counter()
                is_engine_done = output.finish_reason is not None
                delta = text.push(output.new_token_ids)
                if is_engine_done:
                    delta += text.finish()
                finish_reason = FinishReason.STOP if text.is_stopped else output.finish_reason
                message = pb.GenerateResponse(text=delta, token_ids=output.new_token_ids, **routing)
                if finish_reason is None:
                    yield message
                    continue
                now_s = time.perf_counter()
                message.finish_reason = _FINISH_REASONS[finish_reason]
                message.usage.num_prompt_tokens = len(prompt_token_ids)
                message.usage.num_output_tokens = output.num_output_tokens
                message.ttft_s = first_token_s - arrival_s
                message.total_s = now_s - arrival_s
                message.predict_s = predict_s
                yield message
                return
        finally:
            if not is_engine_done:
                outputs.cancel()  # a stop string, a cancelled call or a deadline: abort, free the KV blocks


def _set_status(exc: BaseException, grpc_context: RayServegRPCContext | None) -> None:
    """Put the failure's status on the call; Serve's proxy sends it when the method raises."""
    status = status_of(exc)
    if status is not None and grpc_context is not None:
        grpc_context.set_code(status[0])
        grpc_context.set_details(status[1])
