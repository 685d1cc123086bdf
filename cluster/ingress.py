"""The ingress deployment: ``binserve.v1.Generation`` over gRPC and the OpenAI API over HTTP, one path.

Serve's gRPC proxy (``grpc_options.grpc_servicer_functions`` names
``proto.binserve.v1.generation_pb2_grpc.add_GenerationServicer_to_server``) calls the method named like
the RPC with the request proto and a ``RayServegRPCContext``; a streaming RPC's method is an async
generator. Serve's HTTP proxy sends HTTP requests to the FastAPI app this deployment builds
(``__serve_build_asgi_app__``, ``cluster/openai_api.py``). Both run the same request path:

    API key -> intake (``cluster/intake.py``: checks naming the field, serving defaults, chat template,
    tokenizer) -> length predictor -> binning router -> engine pool -> detokenize
    (``cluster/generation.py``)

Failures map to codes through ``cluster/errors.py``: INVALID_ARGUMENT / 400, UNAUTHENTICATED / 401,
RESOURCE_EXHAUSTED / 429, UNAVAILABLE / 503; each call is counted by API, outcome and bin
(``binserve_requests_total``, ``cluster/prometheus.py``). A cancelled call, an expired deadline or an HTTP client
that disconnects cancels the method, which aborts the engine request and frees its KV blocks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from pathlib import Path

import grpc
import ray
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from cluster.auth import ApiKey
from cluster.config import AppConfig
from cluster.errors import GRPC_STATUS, classify, status_name
from cluster.generation import GenerationChunk, GenerationService
from cluster.intake import GenerationInput, Intake, SamplingDefaults
from cluster.predictor.distribution import DistributionTable
from cluster.predictor_client import InProcessPredictor, PredictorClient, RemotePredictor
from cluster.prometheus import IngressMetrics
from cluster.router import BinRouter
from pipeline.chat import ChatMessage
from pipeline.request import FinishReason
from pipeline.sampling import FIELD_NAMES
from proto.binserve.v1 import generation_pb2 as pb

_FINISH_REASONS = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}


def input_of(request: pb.GenerateRequest) -> GenerationInput:
    """The request proto in the shared path's terms. proto3 cannot tell an empty ``prompt`` or
    ``messages`` from an absent one: empty is absent."""
    messages = tuple(ChatMessage(m.role, m.content) for m in request.messages)
    return GenerationInput(
        prompt=request.prompt or None,
        messages=messages or None,
        stop=tuple(request.stop),
        ignore_eos=request.ignore_eos,
        request_id=request.request_id,
        **{name: getattr(request, name) if request.HasField(name) else None for name in FIELD_NAMES},
    )


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The gRPC status for a failure the caller can act on; ``None`` for a bug (INTERNAL)."""
    classified = classify(exc)
    return None if classified is None else (GRPC_STATUS[classified[0]], classified[1])


def message_of(chunk: GenerationChunk) -> pb.GenerateResponse:
    message = pb.GenerateResponse(
        request_id=chunk.routing.request_id,
        text=chunk.text,
        token_ids=chunk.token_ids,
        predicted_output_tokens=chunk.routing.predicted_output_tokens,
        bin=chunk.routing.bin_id,
    )
    if chunk.final is not None:
        message.finish_reason = _FINISH_REASONS[chunk.finish_reason]
        message.usage.num_prompt_tokens = chunk.final.num_prompt_tokens
        message.usage.num_output_tokens = chunk.final.num_output_tokens
        message.usage.num_cached_prompt_tokens = chunk.final.num_cached_prompt_tokens
        message.ttft_s = chunk.final.ttft_s
        message.total_s = chunk.final.total_s
        message.predict_s = chunk.final.predict_s
    return message


@serve.deployment
@serve.ingress()
class GenerationIngress:
    async def __init__(
        self, config: AppConfig, predictor: DeploymentHandle | None, pools: Sequence[DeploymentHandle]
    ) -> None:
        """``predictor``: the predictor deployment's handle, or None to predict in this process."""
        from workers.checkpoint import load_config, load_tokenizer

        model_dir = config.engine.model.model_dir
        self.config = config
        hf_config = load_config(model_dir)
        self.max_model_len = config.engine.model.max_model_len or hf_config.max_position_embeddings
        self.vocab_size = hf_config.vocab_size
        self.model_id = Path(model_dir).name
        self.api_key = ApiKey.of(config.ingress)
        if predictor is None:
            lengths: PredictorClient = InProcessPredictor(config.predictor, model_dir)
        else:
            lengths = RemotePredictor(predictor)
        boundaries = await lengths.bin_boundaries(config.router.num_bins)
        router = BinRouter.build(
            boundaries,
            config.router.resolved_num_pools,
            config.router.pool_affinity_min_cached_tokens,
            config.router.pool_affinity_max_bin_distance,
        )
        defaults = SamplingDefaults.resolve(model_dir, config.sampling)
        intake = Intake(load_tokenizer(model_dir), config.ingress, defaults, self.max_model_len)
        self.metrics = IngressMetrics(enabled=config.metrics.enabled)
        cache = config.engine.cache
        self.service = GenerationService(
            intake,
            lengths,
            router,
            pools,
            self.metrics,
            config.max_admitted_requests,
            caller=ray.get_runtime_context().current_actor,
            block_size=cache.block_size if cache.enable_prefix_caching else None,  # names prompt blocks
            # The replica router counts each request's mean length under it, the expected_remaining order
            # ranks by it; a predictor without a table (trained before tables) sends the point alone.
            length_distribution=DistributionTable.of_predictor(config.predictor.path),
        )

    def __serve_build_asgi_app__(self):  # Serve calls it once, after __init__
        from cluster.openai_api import build_openai_app

        return build_openai_app(self.service, self.model_id, self.api_key, self.max_model_len, self.metrics)

    # ---- the RPCs -------------------------------------------------------------------------------------

    async def Generate(  # noqa: N802 (Serve calls the method named like the RPC)
        self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext | None = None
    ) -> pb.GenerateResponse:
        """``GenerateStream``'s messages joined into one: the last one's finish reason and usage, every text
        and token id."""
        text, token_ids = [], []
        async with aclosing(self.GenerateStream(request, grpc_context)) as messages:
            async for message in messages:
                text.append(message.text)
                token_ids.extend(message.token_ids)
        del message.token_ids[:]
        message.token_ids.extend(token_ids)
        message.text = "".join(text)
        return message

    async def GenerateStream(  # noqa: N802
        self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext | None = None
    ) -> AsyncIterator[pb.GenerateResponse]:
        failure, bin_id = None, None
        try:
            self._authorize(grpc_context)
            # Closed explicitly: a cancelled call stops this generator at its yield, and the engine request
            # must be aborted now, not whenever the inner generator is collected.
            async with aclosing(self.service.generate(input_of(request))) as chunks:
                async for chunk in chunks:
                    bin_id = chunk.routing.bin_id
                    yield message_of(chunk)
        except BaseException as exc:
            failure = exc
            _set_status(exc, grpc_context)
            raise
        finally:
            self.metrics.observe_request("grpc", status_name(failure), bin_id)

    async def GetModelInfo(  # noqa: N802
        self, request: pb.ModelInfoRequest, grpc_context: RayServegRPCContext | None = None
    ) -> pb.ModelInfo:
        try:
            self._authorize(grpc_context)
        except Exception as exc:
            _set_status(exc, grpc_context)
            raise
        engine, router, intake = self.config.engine, self.service.router, self.service.intake
        defaults = intake.defaults
        return pb.ModelInfo(
            model=self.model_id,
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            num_bins=router.num_bins,
            bin_boundaries=list(router.bin_boundaries),
            pool_of_bin=list(router.pool_of_bin),
            num_pools=router.num_pools,
            scheduler_policy=engine.scheduler.policy.value,
            queue_order=engine.scheduler.queue_order.value,
            chunk_size=engine.scheduler.chunk_size,
            pp_size=engine.parallel.pp_size,
            has_chat_template=intake.has_chat_template,
            sampling_defaults=pb.SamplingDefaults(
                max_tokens=defaults.max_tokens or 0,
                temperature=defaults.temperature,
                top_p=defaults.top_p,
                top_k=defaults.top_k,
                repetition_penalty=defaults.repetition_penalty,
                presence_penalty=defaults.presence_penalty,
                frequency_penalty=defaults.frequency_penalty,
            ),
        )

    def _authorize(self, grpc_context: RayServegRPCContext | None) -> None:
        if grpc_context is not None:  # None: a Serve handle call from inside the cluster
            self.api_key.check(dict(grpc_context.invocation_metadata()).get("authorization"))


def _set_status(exc: BaseException, grpc_context: RayServegRPCContext | None) -> None:
    """Put the failure's status on the call; Serve's proxy sends it when the method raises."""
    status = status_of(exc)
    if status is not None and grpc_context is not None:
        grpc_context.set_code(status[0])
        grpc_context.set_details(status[1])
