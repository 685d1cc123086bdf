"""Serve's request router for an engine pool: send each request to the replica with the least predicted work.

    EnginePool.options(request_router_config=RequestRouterConfig(
        request_router_class=LeastPredictedWorkRouter, request_routing_stats_period_s=0.5))

Serve's default router picks the shorter queue of two random replicas, counting requests; a queue of ten
one-line answers then looks as busy as ten essays. This one ranks every replica by the predicted work of
its outstanding requests (``EnginePool.record_routing_stats``: per request, prompt tokens still to prefill
plus predicted output tokens still to generate), each counted up to the new request's own, plus the
requests this caller sent since that report (``cluster.router.PredictedWorkBook`` holds the choice logic
and says why; this file only adapts it to Serve's hooks). Serve tries the ranks in order and
skips a replica whose queue is full (``max_ongoing_requests``), so the engine's own limit still holds.

Every caller of the pool (each ingress replica's handle) runs its own instance.
"""

from __future__ import annotations

import random
import time

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from cluster.router import PredictedWorkBook
from pipeline.request import NewRequest

WORK_TOKENS_STAT = "predicted_work_tokens"
REPORTED_AT_STAT = "reported_at_s"


def routing_stats(work_tokens: list[int]) -> dict[str, list[int] | float]:
    """What a replica reports (``record_routing_stats``): each outstanding request's predicted work, stamped
    now (a few hundred integers at most: ``pools.max_queued_requests``)."""
    return {WORK_TOKENS_STAT: work_tokens, REPORTED_AT_STAT: time.time()}


def new_request_of(pending_request: PendingRequest | None) -> NewRequest | None:
    """The ``NewRequest`` a ``generate`` call carries; None for other methods (``stats``)."""
    if pending_request is None:
        return None
    return next((a for a in pending_request.args if isinstance(a, NewRequest)), None)


class LeastPredictedWorkRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, **kwargs) -> None:
        self.book = PredictedWorkBook()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Back off between rounds when every replica is full, instead of spinning.
            pending_request.routing_context.should_backoff = True
        for replica in candidate_replicas:
            stats = replica.routing_stats
            if WORK_TOKENS_STAT in stats:
                self.book.report(replica.replica_id, stats[WORK_TOKENS_STAT], stats[REPORTED_AT_STAT])
        self.book.forget_all_but(list(self.curr_replicas))
        new = new_request_of(pending_request)
        work_tokens = new.predicted_work_tokens if new is not None else 1
        by_id = {r.replica_id: r for r in candidate_replicas}
        shuffled = random.sample(list(by_id), len(by_id))  # equal work: no favourite among routers
        return [[by_id[replica_id]] for replica_id in self.book.ranked(shuffled, work_tokens)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        new = new_request_of(pending_request)
        if new is not None:
            request_id = pending_request.metadata.internal_request_id
            self.book.add(replica_id, request_id, new.predicted_work_tokens, time.time())

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.book.complete(replica_id, internal_request_id)
