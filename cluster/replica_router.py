"""Serve's request router for an engine pool: rank the replicas by one of ``cluster.router``'s rules.

    EnginePool.options(request_router_config=RequestRouterConfig(
        request_router_class=BookRouter, request_routing_stats_period_s=0.5,
        request_router_kwargs={"routing": "least_cost", "block_size": 16}))

Serve's default router picks the shorter queue of two random replicas, counting requests; a queue of ten
one-line answers then looks as busy as ten essays, and a replica holding a conversation's history looks no
better than one that must prefill it all again. Each replica reports (``EnginePool.record_routing_stats``)
the predicted work of its outstanding requests (per request, prompt tokens still to prefill plus predicted
output tokens still to generate) and the names of the KV blocks it holds cached (``routing_stats``); this
router keeps them, plus the requests it sent since, in a ``cluster.router.PredictedWorkBook`` and ranks
the replicas by the configured rule (``pools.replica_routing``): least predicted work, least cost (uncached
prefill plus predicted work waited behind), or Ray's prefix affinity. The ingress hashed the prompt's
blocks once (``NewRequest.prompt_block_names``). Serve tries the ranks in order and skips a replica whose
queue is full (``max_ongoing_requests``), so the engine's own limit still holds.

Every caller of the pool (each ingress replica's handle) runs its own instance.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from cluster.config import ReplicaRouting
from cluster.router import (
    MAX_REPORTED_BLOCKS,
    RULES,
    PredictedWorkBook,
    decode_block_names,
    encode_block_names,
)
from pipeline.block_manager import BlockName
from pipeline.request import NewRequest, SamplingParams

WORK_TOKENS_STAT = "predicted_work_tokens"
REPORTED_AT_STAT = "reported_at_s"
CACHED_BLOCKS_STAT = "cached_block_names"


def routing_stats(work_tokens: list[int], cached_block_names: Sequence[BlockName] = ()) -> dict:
    """What a replica reports (``record_routing_stats``): each outstanding request's predicted work (a few
    hundred integers at most: ``pools.max_queued_requests``) and its cached blocks' names, stamped now."""
    return {
        WORK_TOKENS_STAT: work_tokens,
        REPORTED_AT_STAT: time.time(),
        CACHED_BLOCKS_STAT: encode_block_names(cached_block_names[:MAX_REPORTED_BLOCKS]),
    }


def new_request_of(pending_request: PendingRequest | None) -> NewRequest | None:
    """The ``NewRequest`` a ``generate`` call carries; None for other methods (``stats``)."""
    if pending_request is None:
        return None
    return next((a for a in pending_request.args if isinstance(a, NewRequest)), None)


_STATS_CALL = NewRequest("stats", (0,), SamplingParams(max_tokens=1))
"""What a call without a ``NewRequest`` (``stats``) is ranked as: one token of work, nothing cached."""


class BookRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, routing: str = "least_predicted_work", block_size: int = 16, **kwargs) -> None:
        self.rule = RULES[ReplicaRouting(routing)]
        self.book = PredictedWorkBook(block_size=block_size)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Back off between rounds when every replica is full, instead of spinning.
            pending_request.routing_context.should_backoff = True
        for replica in candidate_replicas:
            stats = replica.routing_stats
            if WORK_TOKENS_STAT in stats:
                cached = decode_block_names(stats.get(CACHED_BLOCKS_STAT, b""))
                self.book.report(replica.replica_id, stats[WORK_TOKENS_STAT], stats[REPORTED_AT_STAT], cached)
        self.book.forget_all_but(list(self.curr_replicas))
        new = new_request_of(pending_request)
        by_id = {r.replica_id: r for r in candidate_replicas}
        shuffled = random.sample(list(by_id), len(by_id))  # equal ranks: no favourite among routers
        ranked = self.rule(self.book, shuffled, new or _STATS_CALL)
        if new is not None and ranked:
            # Count it at its first choice now: requests routed before the replica accepts this one (a
            # burst) must see it, or they all follow the same stale report. on_request_routed moves it
            # where it went.
            self._add(ranked[0], pending_request, new)
        return [[by_id[replica_id]] for replica_id in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        new = new_request_of(pending_request)
        if new is not None:
            self._add(replica_id, pending_request, new)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.book.complete(replica_id, internal_request_id)

    def _add(self, replica_id: ReplicaID, pending_request: PendingRequest, new: NewRequest) -> None:
        request_id = pending_request.metadata.internal_request_id
        self.book.add(replica_id, request_id, new.expected_work_tokens, time.time(), new.prompt_block_names)
