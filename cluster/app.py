"""The Serve application: an ingress (gRPC and the OpenAI HTTP API), the global length predictor and one
engine pool per bin group.

A Serve config names it by import path and passes ``args`` (parsed by ``cluster.config.AppConfig``):

    applications:
      - name: binserve
        import_path: cluster.app:build_app
        args: {model: {model_dir: .models/tiny-llama}, router: {num_bins: 2}, parallel: {pp_size: 2}}

The gRPC and HTTP proxies are Serve's, configured in the same file (``grpc_options``, ``http_options``;
see ``deploy/``): one Serve config serves both APIs, through the same ingress deployment.
Deployment names are fixed so operators and tests can reach them: ``ingress``, ``length-predictor`` and
``engine-pool-0 .. engine-pool-{num_pools-1}``.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from cluster.config import AppConfig, PoolConfig, PredictorPlacement, ReplicaRouting
from cluster.engine_pool import EnginePool, RunnerFactory, replica_placement
from cluster.ingress import GenerationIngress
from cluster.predictor_deployment import LengthPredictorDeployment
from cluster.replica_router import BookRouter
from pipeline.config import EngineConfig

INGRESS_NAME = "ingress"
PREDICTOR_NAME = "length-predictor"
SERVICER_FUNCTION = "proto.binserve.v1.generation_pb2_grpc.add_GenerationServicer_to_server"
"""What Serve's ``grpc_options.grpc_servicer_functions`` must list for this application."""
AUTOSCALING_POLICY = "cluster.autoscaling:PredictedTokensPolicy"


INLINE_USER_CODE = {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}
"""The runtime env of the ingress and engine replicas: Serve runs their methods on the replica's own event
loop instead of a second thread's, so each streamed message skips a hop between two loops and a replica
takes a request's tokens as fast as Serve sends its messages (measured by ``binserve bench path``). Every
method of theirs is async and never blocks, or is sync and runs in Serve's thread pool."""


def replica_runtime_env() -> dict[str, Any]:
    """``INLINE_USER_CODE`` on top of the application's own runtime env. A deployment's ``runtime_env``
    replaces the application's (a Serve config's ``runtime_env``, e.g. ``BINSERVE_API_KEY`` for the ingress)
    rather than adding to it, so it must carry both. Serve builds the application in a task that runs in the
    application's runtime env, which is where this reads it."""
    import ray

    inherited: dict[str, Any] = {}
    if ray.is_initialized():
        inherited = dict(ray.get_runtime_context().runtime_env or {})
    env_vars = {**(inherited.get("env_vars") or {}), **INLINE_USER_CODE["env_vars"]}
    return {**inherited, "env_vars": env_vars}


def pool_name(pool_id: int) -> str:
    return f"engine-pool-{pool_id}"


def pool_options(engine: EngineConfig, pools: PoolConfig) -> dict[str, Any]:
    """Serve deployment options for one engine pool (every pool is configured alike)."""
    placement = replica_placement(engine, pools.num_cpus, pools.num_gpus)
    options: dict[str, Any] = {
        **placement,
        "ray_actor_options": {**placement["ray_actor_options"], "runtime_env": replica_runtime_env()},
        # The engine's SSJF queue must hold the waiting requests, not Serve's FIFO in front of it: admit
        # one more call than the engine queues, so a full queue answers QueueFullError (RESOURCE_EXHAUSTED).
        "max_ongoing_requests": pools.max_queued_requests + 1,
        # Bursts beyond that wait briefly in each caller's handle, up to a bound; past it, BackPressureError
        # (RESOURCE_EXHAUSTED) sheds load rather than queueing without limit.
        "max_queued_requests": pools.max_queued_requests,
        "health_check_period_s": 10.0,
        "graceful_shutdown_timeout_s": 20.0,
    }
    if pools.replica_routing is not ReplicaRouting.POWER_OF_TWO:  # Serve's own router otherwise
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=BookRouter,
            request_routing_stats_period_s=pools.routing_stats_period_s,
            request_router_kwargs={
                "routing": pools.replica_routing.value,
                "block_size": engine.cache.block_size,
            },
        )
    if pools.is_autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": pools.min_replicas,
            "max_replicas": pools.max_replicas,
            "initial_replicas": max(1, pools.min_replicas),
            "upscale_delay_s": pools.upscale_delay_s,
            "downscale_delay_s": pools.downscale_delay_s,
            "look_back_period_s": pools.look_back_period_s,
            # How often replicas push their reports (Serve's default, 10 s, is slow for LLM bursts).
            "metrics_interval_s": pools.look_back_period_s / 4,
            "policy": {
                "policy_function": AUTOSCALING_POLICY,
                "policy_kwargs": {"target_outstanding_tokens": pools.target_outstanding_tokens},
            },
        }
    else:
        options["num_replicas"] = pools.min_replicas
    return options


def build_application(
    config: AppConfig, predictor: Application | None = None, runner_factory: RunnerFactory | None = None
) -> Application:
    """The application for ``config``. ``predictor`` replaces the length predictor: any bound deployment
    with ``predict(prompt) -> int`` and ``bin_boundaries(num_bins) -> list[int]``. Without one, the
    predictor runs in the ingress (``predictor.placement: ingress``) or as its own deployment.
    ``runner_factory`` replaces the model in every engine replica (``bench/path_runner.py``)."""
    if predictor is None and config.predictor.placement is PredictorPlacement.DEPLOYMENT:
        predictor = LengthPredictorDeployment.options(
            name=PREDICTOR_NAME,
            num_replicas=config.predictor.num_replicas,
            ray_actor_options={"num_cpus": config.predictor.num_cpus},
            max_ongoing_requests=4 * config.predictor.max_batch_size,
        ).bind(config.predictor, config.engine.model.model_dir)
    pools = [
        EnginePool.options(name=pool_name(pool_id), **pool_options(config.engine, config.pools)).bind(
            config.engine,
            pool_id,
            config.pools,
            config.metrics.interval_s if config.metrics.enabled else None,
            runner_factory,
        )
        for pool_id in range(config.router.resolved_num_pools)
    ]
    return GenerationIngress.options(
        name=INGRESS_NAME,
        num_replicas=config.ingress.num_replicas,
        max_replicas_per_node=config.ingress.max_replicas_per_node,
        ray_actor_options={"num_cpus": config.ingress.num_cpus, "runtime_env": replica_runtime_env()},
        # Load is shed at three places, cheapest first: the gRPC proxy's gate (cluster/grpc_proxy.py),
        # the ingress beyond its admission bound (it takes INGRESS_HEADROOM calls more to refuse them
        # itself), the pools beyond theirs.
        max_ongoing_requests=config.ingress_max_ongoing_requests,
        max_queued_requests=config.ingress.max_queued_requests or -1,  # -1: Serve's "no bound"
    ).bind(config, predictor, pools)


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application builder: ``import_path: cluster.app:build_app`` with ``args``."""
    return build_application(AppConfig.from_args(args))
