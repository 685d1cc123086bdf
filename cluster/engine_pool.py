"""An engine pool: a Serve deployment whose replicas each own one engine and stream its tokens back.

    pool = EnginePool.options(name="engine-pool-0").bind(engine_config, pool_id=0, pools=PoolConfig())
    async for out in handle.options(stream=True).generate.remote(NewRequest(...)):   # RequestOutput
        ...

The ingress sends every request of a bin to the pool serving that bin. Inside a replica the engine's
scheduler orders its waiting queue shortest-predicted-job first (``SchedulerConfig.queue_order="ssjf"``)
and batches with SARATHI's chunked prefills. So that queue really is the replica's queue, the replica
accepts up to ``max_queued_requests`` concurrent calls (Serve's ``max_ongoing_requests``) rather than
leaving them in Serve's FIFO in front of it.

Cancelling a call (a cancelled gRPC stream, an expired deadline) cancels ``generate`` here, which aborts
the request in the engine and frees its KV blocks. So does the death of the caller (an ingress replica lost
with its process or node: ``cluster/caller_watch.py``).
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import serve

from cluster.autoscaling import OUTSTANDING_TOKENS_METRIC
from cluster.caller_watch import CallerWatch
from cluster.config import PoolConfig
from cluster.prometheus import EngineMetrics, EngineSnapshot
from cluster.replica_router import routing_stats
from cluster.router import MAX_REPORTED_BLOCKS
from pipeline.config import EngineConfig
from pipeline.driver import EngineDriver
from pipeline.engine import RequestOutput, Runner
from pipeline.request import NewRequest

RunnerFactory = Callable[[EngineConfig], Runner]
"""Builds a replica's runner from its config, in the replica's process (it must pickle: Serve ships it).
The served default is the model (``build_driver``); benchmarks inject others (``bench/path_runner.py``)."""


@dataclass(frozen=True)
class EngineStats:
    """One replica's state, for tests, the demo and operators."""

    pool_id: int
    num_kv_blocks: int
    num_free_kv_blocks: int
    num_unfinished_requests: int
    outstanding_predicted_tokens: int
    num_requests_by_bin: dict[int, int]
    """Requests this replica has accepted since it started, by bin."""
    num_cancelled_requests: int
    """Calls cancelled before their request finished (a cancelled stream, a deadline, a stop string)."""
    pp_size: int
    """Pipeline stages (micro-batches in flight) of this replica's runner."""
    pids: tuple[int, ...]
    """Processes of this replica: the replica itself, then its stage actors (fault checks kill them)."""
    node_ids: tuple[str, ...]
    """The Ray nodes of those processes, in the same order."""
    num_orphaned_requests: int = 0
    """Of the cancelled calls, those cancelled because their caller died (``cluster/caller_watch.py``)."""
    num_requests_by_caller: dict[str, int] = field(default_factory=dict)
    """Calls running now, by their caller's actor id (hex): which ingress replica each came through."""
    cpu_s: float = 0.0
    """CPU seconds the replica's process has used since it started, every thread (``time.process_time``):
    how busy it has been, beside its peers."""
    num_preemptions: int = 0
    """Requests the scheduler has preempted (their KV freed, to be recomputed) since the replica started."""
    num_evicted_kv_blocks: int = 0
    """Cached KV blocks evicted to make room since the replica started."""


def replica_placement(engine: EngineConfig, num_cpus: float, num_gpus: float) -> dict[str, Any]:
    """Serve options placing one replica: ``ray_actor_options``, and with stage actors (``pp_size > 1``, or
    ``parallel.separate_model_process``) the placement group every replica reserves: its own bundle, then one
    per stage actor (a GPU each, or the stage's CPU threads), packed together or spread over nodes
    (``parallel.stage_placement``).

    The model in the replica's process: the replica takes ``num_cpus`` and ``num_gpus``.
    In stage actors: the replica only schedules and streams (``num_cpus``, no GPU); ``build_driver`` places
    the stage actors in bundles 1 .. pp_size of the replica's group.
    """
    if not engine.parallel.uses_stage_actors:
        return {"ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus}}
    from workers.pipeline_runner import PLACEMENT_STRATEGIES, pipeline_bundles, uses_gpus

    stages = pipeline_bundles(engine.parallel, use_gpu=uses_gpus(engine))
    return {
        "ray_actor_options": {"num_cpus": num_cpus},
        "placement_group_bundles": [{"CPU": num_cpus}, *stages],
        "placement_group_strategy": PLACEMENT_STRATEGIES[engine.parallel.stage_placement],
    }


def build_driver(
    config: EngineConfig, pools: PoolConfig, runner_factory: RunnerFactory | None = None
) -> EngineDriver:
    """An engine driver for this config, the one thing a replica needs: one ``ModelRunner`` with every
    layer in this process, or (``parallel.uses_stage_actors``) a pipeline of stage actors in this replica's
    placement group (bundle 0 is the replica's own; see ``replica_placement``), ``pp_size`` micro-batches in
    flight; or what ``runner_factory`` builds."""
    from workers.llm import build_engine

    if runner_factory is not None:
        runner = runner_factory(config)
    elif config.parallel.uses_stage_actors:
        from ray.util import get_current_placement_group

        from workers.pipeline_runner import PipelineRunner

        runner = PipelineRunner.create(
            config, placement_group=get_current_placement_group(), first_bundle_index=1
        )
    else:
        from workers.runner import ModelRunner

        runner = ModelRunner(config.model, config.cache)
    return EngineDriver(
        build_engine(config, runner),
        max_queued_requests=pools.max_queued_requests,
        max_buffered_tokens=pools.max_buffered_tokens,
        min_stream_interval_s=pools.stream_interval_s,
    )


@serve.deployment
class EnginePool:
    def __init__(
        self,
        config: EngineConfig,
        pool_id: int,
        pools: PoolConfig,
        metrics_interval_s: float | None = 1.0,
        runner_factory: RunnerFactory | None = None,
    ) -> None:
        """``metrics_interval_s``: how often the replica's gauges are sampled; None exports no metrics.
        ``runner_factory``: the replica's runner instead of the model (benchmarks of the serving path)."""
        import torch

        # One intra-op thread per stage unless configured: OpenMP threads spinning against each other
        # on a shared host cost far more than they give.
        torch.set_num_threads(config.parallel.torch_threads)
        self.pool_id = pool_id
        self.driver = build_driver(config, pools, runner_factory)
        self._num_requests_by_bin: collections.Counter[int] = collections.Counter()
        self._num_cancelled_requests = 0
        self.callers = CallerWatch()
        self.metrics: EngineMetrics | None = None
        if metrics_interval_s is not None:
            self.metrics = EngineMetrics()
            self.driver.engine.add_step_observer(self.metrics.observe_step)
            threading.Thread(
                target=self._report_metrics, args=(metrics_interval_s,), name="metrics", daemon=True
            ).start()
        self.driver.start()

    async def generate(self, request: NewRequest, caller: Any | None = None) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs; the last has ``finish_reason`` set. ``ValueError`` (bad input),
        ``QueueFullError`` and ``EngineDeadError`` reach the caller as the exception of the call.
        ``caller``: the calling actor's handle (an ingress replica); its death aborts the request."""
        self._num_requests_by_bin[request.bin_id] += 1
        try:
            with self.callers.calls_of(caller):
                async for output in self.driver.generate(request):
                    if output.metrics is not None and self.metrics is not None:
                        self.metrics.observe_finished(output.metrics, output.finish_reason)
                    yield output
        except (asyncio.CancelledError, GeneratorExit):
            self._num_cancelled_requests += 1  # the driver has aborted the request
            raise

    def stats(self) -> EngineStats:
        block_manager = self.driver.engine.scheduler.block_manager
        return EngineStats(
            pool_id=self.pool_id,
            num_kv_blocks=block_manager.num_blocks,
            num_free_kv_blocks=block_manager.num_free_blocks,
            num_unfinished_requests=self.driver.num_unfinished,
            outstanding_predicted_tokens=self.driver.outstanding_predicted_tokens(),
            num_requests_by_bin=dict(self._num_requests_by_bin),
            num_cancelled_requests=self._num_cancelled_requests,
            pp_size=self.driver.engine.runner.depth,
            pids=(os.getpid(), *getattr(self.driver.engine.runner, "stage_pids", ())),
            node_ids=(
                ray.get_runtime_context().get_node_id(),
                *getattr(self.driver.engine.runner, "stage_node_ids", ()),
            ),
            num_orphaned_requests=self.callers.num_aborted_calls,
            num_requests_by_caller=self.callers.num_calls_by_caller(),
            cpu_s=time.process_time(),
            num_preemptions=self.driver.engine.scheduler.num_preemptions,
            num_evicted_kv_blocks=block_manager.num_evicted_blocks,
        )

    def _report_metrics(self, interval_s: float) -> None:
        """Sample the replica's state into the gauges until the driver stops (a daemon thread)."""
        runner = self.driver.engine.runner
        stats = getattr(runner, "stats", None)  # a pipeline of stage actors reports its bubbles
        previous = stats() if stats else None
        while not self.driver.is_stopped:
            time.sleep(interval_s)
            scheduler = self.driver.engine.scheduler
            bubble_fraction, utilisation = None, ()
            if stats is not None:
                # Reported every interval (Ray drops a gauge that is not set again); an interval without
                # work has no bubbles and idle stages.
                current = stats()
                window = current.since(previous)
                previous = current
                bubble_fraction, utilisation = window.bubble_fraction, window.stage_utilisation
            self.metrics.report(
                EngineSnapshot(
                    num_kv_blocks=scheduler.block_manager.num_blocks,
                    num_free_kv_blocks=scheduler.block_manager.num_free_blocks,
                    num_running=len(scheduler.running),
                    num_waiting=len(scheduler.waiting),
                    num_preemptions=scheduler.num_preemptions,
                    outstanding_predicted_tokens=self.driver.outstanding_predicted_tokens(),
                    bubble_fraction=bubble_fraction,
                    stage_utilisation=utilisation,
                    num_cached_kv_blocks=scheduler.block_manager.num_cached_blocks,
                    num_evicted_kv_blocks=scheduler.block_manager.num_evicted_blocks,
                    num_prefix_queried_tokens=scheduler.block_manager.num_queried_tokens,
                    num_prefix_hit_tokens=scheduler.block_manager.num_hit_tokens,
                )
            )

    def record_routing_stats(self) -> dict:
        """Serve's hook for routing stats, called every ``pools.routing_stats_period_s``: the predicted work
        of each unfinished request and the names of the cached KV blocks, which the replica router
        (``cluster/replica_router.py``) weighs."""
        block_manager = self.driver.engine.scheduler.block_manager
        return routing_stats(
            self.driver.expected_work_tokens(), block_manager.cached_block_names(MAX_REPORTED_BLOCKS)
        )

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's hook for custom autoscaling metrics, pushed to the controller periodically."""
        return {OUTSTANDING_TOKENS_METRIC: float(self.driver.outstanding_predicted_tokens())}

    def check_health(self) -> None:
        """A dead runner makes the replica unhealthy, so Serve replaces it."""
        if not self.driver.is_healthy:
            raise RuntimeError(f"engine of pool {self.pool_id} is dead: {self.driver.error}")

    def __del__(self) -> None:
        driver = getattr(self, "driver", None)
        if driver is not None:
            driver.stop()
            shutdown = getattr(driver.engine.runner, "shutdown", None)  # a pipeline's stage actors
            if shutdown is not None:
                shutdown()
