"""A model replica as a pipeline of stage actors joined by a Ray compiled graph.

    runner = PipelineRunner.create(config)              # config.parallel.pp_size stage actors
    engine = build_engine(config, runner)               # keeps runner.depth micro-batches in flight
    ...
    print(runner.stats().bubble_fraction)
    runner.shutdown()

Data path: ``submit(plan)`` writes the plan into the compiled graph's input channel, which every stage
reads; hidden states go from each stage straight to the next through a channel (shared memory on CPU,
NCCL between GPUs), never through the driver; the last stage samples and only its small
``MicroBatchResult`` comes back. The graph is compiled for ``pp_size`` executions in flight, so while
the last stage works on micro-batch k the first is already on k+1 (SARATHI's micro-batches of uniform
compute keep them all equally busy).

Placement: one bundle per stage (``pipeline_bundles``), packed on few nodes or spread over many
(``parallel.stage_placement``). Standalone, the runner reserves its own placement group; in a Ray Serve
replica that reserved ``placement_group_bundles=[replica bundle, *pipeline_bundles(...)]``, pass the
replica's group and ``first_bundle_index=1``. Across nodes the compiled graph's channels go through Ray's
object transfer instead of one node's shared memory; the tokens are the same.

Failure: a dead stage actor tears the graph down (Ray's monitor), so a pending ``collect`` raises
``StageFailedError`` naming the stage at once; a hung stage raises after ``step_timeout_s``.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from dataclasses import dataclass

import ray
from ray.dag import InputNode
from ray.dag.compiled_dag_node import CompiledDAG
from ray.exceptions import GetTimeoutError, RayActorError, RayChannelError, RayChannelTimeoutError
from ray.experimental.compiled_dag_ref import CompiledDAGRef
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pipeline.config import EngineConfig, ParallelConfig, StagePlacement
from pipeline.plan import StepOutput, StepPlan
from workers.checkpoint import load_config
from workers.partition import stage_layer_ranges
from workers.stage_worker import MicroBatchResult, StageActor


class StageFailedError(RuntimeError):
    """A pipeline stage died or hung; the replica cannot serve until it is rebuilt."""


@dataclass(frozen=True)
class PipelineStats:
    """How busy the stages were while the pipeline had work.

    ``active_s`` counts only time with at least one micro-batch in flight: an idle replica has no
    bubbles, it has no work. Busy time is each stage's own compute per micro-batch; channel transfers,
    waiting for the previous stage and the driver's scheduling between micro-batches are bubbles."""

    num_micro_batches: int
    active_s: float
    stage_busy_s: tuple[float, ...]
    max_in_flight: int
    """The most micro-batches that were in flight at once."""

    @property
    def num_stages(self) -> int:
        return len(self.stage_busy_s)

    @property
    def bubble_s(self) -> float:
        """Stage-seconds idle: ``active_s x stages - total busy``."""
        return self.active_s * self.num_stages - sum(self.stage_busy_s)

    @property
    def bubble_fraction(self) -> float:
        """``1 - total busy / (active time x stages)``."""
        capacity_s = self.active_s * self.num_stages
        return 1.0 - sum(self.stage_busy_s) / capacity_s if capacity_s > 0 else 0.0

    @property
    def stage_utilisation(self) -> tuple[float, ...]:
        return tuple(busy / self.active_s if self.active_s > 0 else 0.0 for busy in self.stage_busy_s)

    def since(self, earlier: PipelineStats) -> PipelineStats:
        """The stats of the window between ``earlier`` and these (both cumulative)."""
        return PipelineStats(
            self.num_micro_batches - earlier.num_micro_batches,
            self.active_s - earlier.active_s,
            tuple(a - b for a, b in zip(self.stage_busy_s, earlier.stage_busy_s, strict=True)),
            self.max_in_flight,
        )


def uses_gpus(config: EngineConfig) -> bool:
    device = config.model.device
    if device == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return device.startswith("cuda")


def pipeline_bundles(parallel: ParallelConfig, use_gpu: bool) -> list[dict[str, float]]:
    """One bundle per stage: a GPU each where there are GPUs, else the stage's CPU threads."""
    bundle = {"GPU": 1.0} if use_gpu else {"CPU": float(parallel.torch_threads)}
    return [dict(bundle) for _ in range(parallel.pp_size)]


PLACEMENT_STRATEGIES: dict[StagePlacement, str] = {
    StagePlacement.PACK: "PACK",
    StagePlacement.SPREAD: "SPREAD",
}
"""Ray's placement group strategy for each ``parallel.stage_placement`` (both best effort: a replica is
placed whenever the cluster has room, on however many nodes it takes)."""


def start_local_ray(parallel: ParallelConfig) -> None:
    """Start Ray in this process, sized for one pipeline, unless it is already up."""
    if not ray.is_initialized():
        num_cpus = max(os.cpu_count() or 1, parallel.pp_size * parallel.torch_threads)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


class PipelineRunner:
    """Runs ``StepPlan``s through ``pp_size`` stage actors; ``depth`` of them may be in flight."""

    def __init__(
        self,
        stages: list[ray.actor.ActorHandle],
        layer_ranges: list[tuple[int, int]],
        num_blocks: int,
        vocab_size: int,
        use_gpu: bool,
        step_timeout_s: float,
        owned_placement_group: PlacementGroup | None = None,
    ) -> None:
        self.stages = stages
        self.layer_ranges = layer_ranges
        self.num_blocks = num_blocks
        self.vocab_size = vocab_size
        self.depth = len(stages)
        self.stage_pids: tuple[int, ...] = ()
        """The stage actors' processes (set by ``create``; fault checks kill them)."""
        self.stage_node_ids: tuple[str, ...] = ()
        """The Ray nodes the stage actors run on, in stage order (set by ``create``)."""
        self.step_timeout_s = step_timeout_s
        # On GPU hosts there are cores to spare and a blocking read has the lowest latency.
        self._poll_interval_s = None if use_gpu else 0.0005
        self._owned_placement_group = owned_placement_group
        self._stage_of_actor = {stage._actor_id.hex(): i for i, stage in enumerate(stages)}
        self._pending: collections.deque[tuple[StepPlan, CompiledDAGRef]] = collections.deque()
        self._error: StageFailedError | None = None
        self._dag = self._compile(use_gpu)
        self.reset_stats()

    @classmethod
    def create(
        cls,
        config: EngineConfig,
        placement_group: PlacementGroup | None = None,
        first_bundle_index: int = 0,
        step_timeout_s: float = 60.0,
        placement_timeout_s: float = 60.0,
    ) -> PipelineRunner:
        """Partition the model, place one stage actor per bundle, size the KV pool, compile the graph."""
        parallel = config.parallel
        hf_config = load_config(config.model.model_dir)
        sampled_rows = min(config.scheduler.chunk_size, -(-config.scheduler.max_num_seqs // parallel.pp_size))
        ranges = stage_layer_ranges(hf_config, parallel.pp_size, config.scheduler.chunk_size, sampled_rows)
        use_gpu = uses_gpus(config)
        owned = None
        if placement_group is None:
            bundles = pipeline_bundles(parallel, use_gpu)
            placement_group = owned = ray.util.placement_group(
                bundles, strategy=PLACEMENT_STRATEGIES[parallel.stage_placement]
            )
            try:
                ray.get(owned.ready(), timeout=placement_timeout_s)
            except GetTimeoutError:
                remove_placement_group(owned)
                raise ValueError(
                    f"pp_size: cannot reserve {bundles} within {placement_timeout_s:.0f} s; "
                    f"the cluster has {ray.available_resources()} available"
                ) from None
        # Inside a GPU actor its one GPU is "cuda" (Ray sets CUDA_VISIBLE_DEVICES), whatever was named.
        model = dataclasses.replace(config.model, device="cuda") if use_gpu else config.model
        resources = {"num_gpus": 1, "num_cpus": 0} if use_gpu else {"num_cpus": parallel.torch_threads}
        stages = [
            StageActor.options(
                **resources,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group, placement_group_bundle_index=first_bundle_index + i
                ),
            ).remote(model, layer_range, parallel.torch_threads)
            for i, layer_range in enumerate(ranges)
        ]
        try:
            capacities = ray.get([s.kv_capacity_blocks.remote(config.cache) for s in stages])
            num_blocks = min(capacities)
            cache = dataclasses.replace(config.cache, num_blocks=num_blocks)
            [vocab_size, *_] = ray.get([s.load.remote(cache) for s in stages])
            runner = cls(stages, ranges, num_blocks, vocab_size, use_gpu, step_timeout_s, owned)
            runner.stage_pids = tuple(ray.get([s.pid.remote() for s in stages]))
            node_of_bundle = placement_group_table(placement_group)["bundles_to_node_id"]
            runner.stage_node_ids = tuple(node_of_bundle[first_bundle_index + i] for i in range(len(stages)))
            return runner
        except BaseException:
            for stage in stages:
                ray.kill(stage)
            if owned is not None:
                remove_placement_group(owned)
            raise

    def _compile(self, use_gpu: bool) -> CompiledDAG:
        with InputNode() as plan:
            node = self.stages[0].forward.bind(plan)
            for stage in self.stages[1:]:
                if use_gpu:
                    node = node.with_tensor_transport(transport="accelerator")  # NCCL, GPU to GPU
                node = stage.forward.bind(plan, node)
        return node.experimental_compile(
            _max_inflight_executions=self.depth, _submit_timeout=self.step_timeout_s
        )

    # ---- the engine's Runner interface ------------------------------------------------------------

    def submit(self, plan: StepPlan) -> None:
        if self._error is not None:
            raise self._error
        if not self._pending:
            self._active_since_s = time.perf_counter()
        try:
            ref = self._dag.execute(plan)
        except (RayChannelError, RayActorError) as exc:
            raise self._fail(exc) from exc
        self._pending.append((plan, ref))
        self._max_in_flight = max(self._max_in_flight, len(self._pending))

    def collect(self) -> StepOutput:
        if self._error is not None:
            raise self._error
        plan, ref = self._pending.popleft()
        try:
            result: MicroBatchResult = self._wait(ref)
        except (RayChannelError, RayActorError) as exc:  # RayChannelTimeoutError is a RayChannelError
            raise self._fail(exc) from exc
        assert result.output.step_id == plan.step_id, "micro-batches complete in submission order"
        self._num_micro_batches += 1
        self._stage_busy_s = [a + b for a, b in zip(self._stage_busy_s, result.stage_busy_s, strict=True)]
        if not self._pending:
            self._active_s += time.perf_counter() - self._active_since_s
        return result.output

    def _wait(self, ref: CompiledDAGRef) -> MicroBatchResult:
        if self._poll_interval_s is not None:
            # Ray's channel read waits by spinning (sched_yield), which on a CPU-only host takes a core
            # from the stages: measured on 2 cores, it made the SARATHI benchmark 25% slower. Poll
            # instead; a zero-timeout read consumes nothing until the result is there. (A private
            # method of Ray 2.60's CompiledDAG; the blocking ``ray.get`` below is the public path.)
            deadline_s = time.monotonic() + self.step_timeout_s
            while not self._is_done(ref):
                if time.monotonic() > deadline_s:
                    raise RayChannelTimeoutError(f"no result within {self.step_timeout_s} s")
                time.sleep(self._poll_interval_s)
        return ray.get(ref, timeout=self.step_timeout_s)

    def _is_done(self, ref: CompiledDAGRef) -> bool:
        try:
            self._dag._execute_until(ref._execution_index, timeout=0)
        except RayChannelTimeoutError:
            return False
        return True

    def _fail(self, exc: BaseException) -> StageFailedError:
        """Name what went wrong; the refs in flight stay until ``shutdown`` tears the graph down."""
        if isinstance(exc, RayChannelTimeoutError):
            what = f"no micro-batch came back within {self.step_timeout_s:.0f} s (a stage is hung)"
        else:
            deaths = []
            for i in self._dead_stages(exc):
                start, end = self.layer_ranges[i]
                deaths.append(f"stage {i} (layers [{start}, {end})) died")
            what = "; ".join(deaths) or f"the stage graph closed ({type(exc).__name__}: {exc})"
        self._error = StageFailedError(f"pipeline: {what}; the micro-batches in flight are lost")
        return self._error

    def _dead_stages(self, exc: BaseException, probe_timeout_s: float = 5.0) -> list[int]:
        if isinstance(exc, RayActorError) and exc.actor_id in self._stage_of_actor:
            return [self._stage_of_actor[exc.actor_id]]
        # A closed channel does not say whose death closed it: ask every stage. Live ones answer once
        # the torn-down graph has released them; a dead one answers at once with RayActorError.
        probes = [stage.__ray_ready__.remote() for stage in self.stages]
        ray.wait(probes, num_returns=len(probes), timeout=probe_timeout_s)
        dead = []
        for i, probe in enumerate(probes):
            try:
                ray.get(probe, timeout=0)
            except RayActorError:
                dead.append(i)
            except GetTimeoutError:
                pass
        return dead

    # ---- accounting and lifecycle ---------------------------------------------------------------

    def stats(self) -> PipelineStats:
        active_s = self._active_s
        if self._pending:
            active_s += time.perf_counter() - self._active_since_s
        return PipelineStats(
            self._num_micro_batches, active_s, tuple(self._stage_busy_s), self._max_in_flight
        )

    def reset_stats(self) -> None:
        self._num_micro_batches = 0
        self._active_s = 0.0
        self._active_since_s = time.perf_counter()
        self._stage_busy_s = [0.0] * len(self.stages)
        self._max_in_flight = 0

    def shutdown(self) -> None:
        """Tear the graph down and end the stage actors (and the placement group this runner made)."""
        self._dag.teardown(kill_actors=True)
        self._pending.clear()  # after the teardown, so the dropped refs do not try to read the channels
        for stage in self.stages:
            ray.kill(stage)
        if self._owned_placement_group is not None:
            remove_placement_group(self._owned_placement_group)
            self._owned_placement_group = None


def build_pipeline_runner(config: EngineConfig) -> PipelineRunner:
    """The offline entry point (``LLM``, ``binserve generate --pp N``): starts Ray here if needed."""
    start_local_ray(config.parallel)
    return PipelineRunner.create(config)
