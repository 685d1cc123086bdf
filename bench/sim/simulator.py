"""Discrete-event simulation of a binserve cluster, running the project's own scheduler and router.

    sim = ClusterSimulator(SimConfig(scheduler=SchedulerConfig(), num_replicas=16), cost_model, router)
    metrics = sim.run(requests)                         # one RequestMetrics per request

Each replica is the real ``pipeline.scheduler.Scheduler`` (the same object the engine drives); only
the model is replaced: an iteration takes ``cost_model.step_time_s(plan)`` of virtual time, and every
sampled token is the request's own ``SimRequest.output_token_ids`` at that position (a non-EOS filler
when it has none), since output lengths are forced (``ignore_eos``) as in the benchmarks. Requests reach
a pool through the real ``cluster.router.BinRouter`` (or all go to one pool for plain load balancing)
and, inside a pool, a replica chosen by ``SimConfig.replica_routing``:

- ``None``: the replica with the fewest unfinished requests, known exactly (an ideal length-blind
  balancer, for reference: no deployment has it);
- ``power_of_two``: Serve's default, the one with fewer unfinished requests of two drawn at random;
- the served rules (``cluster.router.RULES``: ``least_predicted_work``, ``least_cost``,
  ``prefix_affinity``) over one ``cluster.router.PredictedWorkBook`` per pool, as the deployed router runs
  them: each replica reports its requests' predicted work (``Request.expected_work_tokens``) and its
  cached block names every ``routing_stats_period_s``, and the book adds the requests routed since.

Prefix caching (``SimConfig.enable_prefix_caching``): requests that carry token ids
(``SimRequest.prompt_token_ids``) hit the blocks earlier requests computed, by the block manager's own
chained names, and a plan then prefills only the uncached tokens, which is all the cost model charges. A
conversation's next turn (``SimRequest.follows``) arrives a think time after the turn it follows
finished, its prompt resending that turn's prompt and answer.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.sim.cost_model import StepCostModel
from cluster.config import PoolConfig, ReplicaRouting
from cluster.router import MAX_REPORTED_BLOCKS, RULES, BinRouter, PredictedWorkBook
from pipeline.block_manager import prompt_block_names
from pipeline.config import SchedulerConfig, check_range, to_enum
from pipeline.engine import RequestMetrics
from pipeline.length_distribution import OutputLengthDistribution
from pipeline.plan import ScheduledChunk, StepOutput, StepPlan
from pipeline.request import NewRequest, Request, SamplingParams
from pipeline.scheduler import Scheduler

_FILLER_TOKEN = 0


@dataclass(frozen=True)
class SimRequest:
    arrival_s: float
    """Seconds from the start; for a follow-up turn (``follows``), seconds after the turn it follows
    finished (the user's think time)."""
    prompt_tokens: int
    output_tokens: int
    predicted_output_tokens: int | None = None
    """What the router and SSJF see; ``None`` means the oracle (the true output length)."""
    prompt_token_ids: tuple[int, ...] = ()
    """The prompt's tokens, ``prompt_tokens`` of them, for prefix hits; empty: filler tokens (no hits)."""
    output_token_ids: tuple[int, ...] = ()
    """The tokens the replica samples, ``output_tokens`` of them, so a next turn can resend them exactly;
    empty: filler tokens."""
    follows: int | None = None
    """The index of the request (earlier in the list) this turn follows: it is sent only when that one
    finished."""
    output_length_distribution: OutputLengthDistribution | None = None
    """The predicted length's spread around ``predicted`` (the ``expected_remaining`` order reads it)."""

    def __post_init__(self) -> None:
        if self.prompt_token_ids and len(self.prompt_token_ids) != self.prompt_tokens:
            raise ValueError(
                f"prompt_token_ids: must hold prompt_tokens ({self.prompt_tokens}), got {len(self.prompt_token_ids)}"
            )
        if self.output_token_ids and len(self.output_token_ids) != self.output_tokens:
            raise ValueError(
                f"output_token_ids: must hold output_tokens ({self.output_tokens}), got {len(self.output_token_ids)}"
            )

    @property
    def predicted(self) -> int:
        return self.output_tokens if self.predicted_output_tokens is None else self.predicted_output_tokens


@dataclass(frozen=True)
class SimConfig:
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    num_replicas: int = 1
    """Engine replicas in the whole cluster, split over the router's pools by ``pool_weights``."""
    pool_weights: tuple[float, ...] | None = None
    """Relative work of each pool (e.g. its bins' predicted output tokens); None splits evenly. Equal-mass
    bins hold equal numbers of requests, not equal work, so even pools leave the long bins' pool short."""
    num_blocks: int = 100_000
    block_size: int = 16
    max_model_len: int = 1 << 20
    enable_prefix_caching: bool = False
    """``CacheConfig.enable_prefix_caching``: requests with token ids hit blocks earlier ones computed."""
    replica_routing: ReplicaRouting | None = None
    """How a pool picks a replica, as a deployment's ``pools.replica_routing`` does; ``None``: the ideal
    balancer, fewest unfinished requests known exactly."""
    routing_stats_period_s: float = PoolConfig.routing_stats_period_s
    """The served rules: how often replicas report their work and cached blocks (the deployed default)."""
    seed: int = 0
    """Random draws of ``power_of_two`` and tie-breaks."""

    def __post_init__(self) -> None:
        if self.replica_routing is not None:
            object.__setattr__(
                self, "replica_routing", to_enum("replica_routing", self.replica_routing, ReplicaRouting)
            )
        check_range("num_replicas", self.num_replicas, 1)
        check_range("num_blocks", self.num_blocks, 1)
        check_range("block_size", self.block_size, 1)
        if self.pool_weights is not None and (not self.pool_weights or min(self.pool_weights) <= 0):
            raise ValueError(f"pool_weights: must be positive numbers, got {self.pool_weights}")


def replicas_per_pool(num_replicas: int, weights: Sequence[float]) -> tuple[int, ...]:
    """Split ``num_replicas`` over pools in proportion to ``weights``, at least one each (largest
    remainders get the spare replicas)."""
    if num_replicas < len(weights):
        raise ValueError(
            f"num_replicas: must be at least the number of pools ({len(weights)}), got {num_replicas}"
        )
    spare = num_replicas - len(weights)
    total = sum(weights)
    shares = [spare * w / total for w in weights]
    counts = [1 + int(share) for share in shares]
    by_remainder = sorted(range(len(weights)), key=lambda i: shares[i] - int(shares[i]), reverse=True)
    for i in by_remainder[: num_replicas - sum(counts)]:
        counts[i] += 1
    return tuple(counts)


class _Replica:
    def __init__(self, config: SimConfig) -> None:
        self.scheduler = Scheduler(
            config.scheduler,
            config.num_blocks,
            config.block_size,
            config.max_model_len,
            eos_token_ids=(),
            enable_prefix_caching=config.enable_prefix_caching,
        )
        self.is_busy = False
        self.busy_s = 0.0


class ClusterSimulator:
    def __init__(self, config: SimConfig, cost_model: StepCostModel, router: BinRouter | None = None) -> None:
        self.config = config
        self.cost_model = cost_model
        self.router = router or BinRouter.build([])
        weights = config.pool_weights or (1.0,) * self.router.num_pools
        if len(weights) != self.router.num_pools:
            raise ValueError(f"pool_weights: need one per pool ({self.router.num_pools}), got {len(weights)}")
        self.pools = [
            [_Replica(config) for _ in range(n)] for n in replicas_per_pool(config.num_replicas, weights)
        ]
        self.replicas = [replica for pool in self.pools for replica in pool]
        self._rng = random.Random(config.seed)
        self._work_book = PredictedWorkBook(block_size=config.block_size)
        self.replica_of_request: dict[int, int] = {}
        """Where each request went: its index in the list given to ``run`` -> its index in ``replicas``."""
        self.now_s = 0.0
        self._events: list[tuple[float, int, str, object]] = []
        self._seq = itertools.count()

    def _push(self, time_s: float, kind: str, payload: object) -> None:
        heapq.heappush(self._events, (time_s, next(self._seq), kind, payload))

    def run(
        self, requests: Sequence[SimRequest], max_virtual_s: float = float("inf")
    ) -> list[RequestMetrics]:
        """Simulate until every request finished (or ``max_virtual_s``); metrics in request order."""
        by_request: dict[int, Request] = {}
        follow_up_of = {r.follows: i for i, r in enumerate(requests) if r.follows is not None}
        for i, r in enumerate(requests):
            if r.follows is None:
                self._push(r.arrival_s, "arrival", i)
        while self._events:
            self.now_s, _, kind, payload = heapq.heappop(self._events)
            if self.now_s > max_virtual_s:
                break
            if kind == "arrival":
                by_request[payload] = self._arrive(payload, requests[payload])
            elif kind == "step_done":
                replica, plan = payload
                updates = replica.scheduler.update(plan, _sampled_output(plan, requests), self.now_s)
                for update in updates:
                    follow_up = follow_up_of.get(int(update.request.request_id))
                    if update.finish_reason is not None and follow_up is not None:
                        self._push(self.now_s + requests[follow_up].arrival_s, "arrival", follow_up)
                replica.is_busy = False
                self._start_step(replica)
            else:  # "wake": new arrivals, or a dynamic batch's timeout may have expired
                self._start_step(payload)
        finished = [by_request.get(i) for i in range(len(requests))]
        return [RequestMetrics.of(r) for r in finished if r is not None and r.is_finished]

    def _arrive(self, index: int, sim_request: SimRequest) -> Request:
        route = self.router.route(sim_request.predicted)
        # Token values matter only for prefix hits; otherwise only counts do.
        prompt = sim_request.prompt_token_ids or (_FILLER_TOKEN,) * sim_request.prompt_tokens
        new = NewRequest(
            request_id=str(index),
            prompt_token_ids=prompt,
            params=SamplingParams(max_tokens=sim_request.output_tokens, ignore_eos=True),
            predicted_output_tokens=sim_request.predicted,
            bin_id=route.bin_id,
            # As the ingress does: named only when the engines cache prefixes.
            prompt_block_names=prompt_block_names(prompt, self.config.block_size)
            if self.config.enable_prefix_caching
            else (),
            output_length_distribution=sim_request.output_length_distribution,
        )
        replica = self._choose_replica(self.pools[route.pool_id], new)
        request = Request.of(new, self.now_s)
        replica.scheduler.add(request)
        self.replica_of_request[index] = self.replicas.index(replica)
        if self.config.replica_routing in RULES:
            self._work_book.add(
                id(replica), index, new.expected_work_tokens, self.now_s, new.prompt_block_names
            )
        # Start the replica after every arrival of this instant is queued (a later sequence number at the
        # same time), so a burst forms one batch rather than a batch of the first arrival alone.
        self._push(self.now_s, "wake", replica)
        return request

    def _choose_replica(self, pool: list[_Replica], new: NewRequest) -> _Replica:
        routing = self.config.replica_routing
        if routing is None or len(pool) == 1:
            return min(pool, key=lambda r: len(r.scheduler.requests))
        if routing is ReplicaRouting.POWER_OF_TWO:
            return min(self._rng.sample(pool, 2), key=lambda r: len(r.scheduler.requests))
        by_id = {id(r): r for r in pool}
        for replica in pool:  # the reports due by now (stale by up to one period, as deployed)
            key = id(replica)
            if (
                self.now_s - self._work_book.reported_at_s.get(key, -1e18)
                >= self.config.routing_stats_period_s
            ):
                scheduler = replica.scheduler
                work = [round(r.expected_work_tokens) for r in scheduler.requests.values()]
                cached = scheduler.block_manager.cached_block_names(MAX_REPORTED_BLOCKS)
                self._work_book.report(key, work, self.now_s, cached)
        shuffled = self._rng.sample(list(by_id), len(by_id))  # equal ranks: no favourite
        return by_id[RULES[routing](self._work_book, shuffled, new)[0]]

    def _start_step(self, replica: _Replica) -> None:
        if replica.is_busy or not replica.scheduler.has_unfinished:
            return
        plan = replica.scheduler.schedule(self.now_s)
        if plan.is_empty:
            # Waiting for a dynamic batch to fill: look again when the oldest request's timeout expires
            # (if it already has, only a new arrival can change anything).
            oldest_s = min((r.arrival_s for r in replica.scheduler.waiting), default=self.now_s)
            wake_s = oldest_s + self.config.scheduler.batch_wait_timeout_s
            if wake_s > self.now_s:
                self._push(wake_s, "wake", replica)
            return
        duration_s = self.cost_model.step_time_s(plan)
        replica.is_busy = True
        replica.busy_s += duration_s
        self._push(self.now_s + duration_s, "step_done", (replica, plan))


def _sampled_output(plan: StepPlan, requests: Sequence[SimRequest]) -> StepOutput:
    """Each sampling chunk's token: its request's ``output_token_ids`` at that position, else the filler."""

    def token(chunk: ScheduledChunk) -> int:
        output_ids = requests[int(chunk.request_id)].output_token_ids
        return output_ids[chunk.output_index] if output_ids else _FILLER_TOKEN

    return StepOutput(plan.step_id, tuple(token(c) for c in plan.sampling_chunks))
