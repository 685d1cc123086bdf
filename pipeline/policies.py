"""The scheduler's policies as small objects: which requests a step offers tokens to, in which order.

Two kinds, chosen once from ``SchedulerConfig`` by ``batching_policy`` and ``waiting_queue``:

- **Batching policies** fill a step's plan through the scheduler's two mechanisms,
  ``schedule_decodes`` (one token for each running decode) and ``schedule_prefills`` (the next chunk of
  unfinished prompts, admitting new requests if allowed). ``Sarathi`` (decodes first, then one chunk,
  under ``chunk_size`` tokens), ``PrefillFirst`` (whole prompts; a step that can admit a prompt does
  only prefills: vLLM v0 / Orca) and ``Batch`` (static: a batch is admitted at once and runs to its last
  request; dynamic: it also starts once its oldest request has waited ``batch_wait_timeout_s``).
- **Waiting queues** order the requests that hold no KV blocks: ``FCFSQueue`` by arrival, ``SSJFQueue``
  shortest predicted job first with an aging guard.

Adding a policy is adding a class here and a member to the config's enum; the scheduler does not change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING

from pipeline.config import QueueOrder, SchedulerConfig, SchedulerPolicy
from pipeline.request import Request

if TYPE_CHECKING:
    from pipeline.scheduler import PlanBuilder, Scheduler


# ---- waiting queues ---------------------------------------------------------------------------------


class WaitingQueue(ABC):
    """Requests waiting for KV blocks (new, or preempted and to be recomputed)."""

    def __init__(self) -> None:
        self._requests: list[Request] = []

    def add(self, request: Request) -> None:
        self._requests.append(request)

    def remove(self, request: Request) -> None:
        self._requests.remove(request)

    def __len__(self) -> int:
        return len(self._requests)

    def __iter__(self) -> Iterator[Request]:
        return iter(list(self._requests))

    @abstractmethod
    def ordered(self, now_s: float) -> list[Request]:
        """The waiting requests in service order."""


class FCFSQueue(WaitingQueue):
    def ordered(self, now_s: float) -> list[Request]:
        return sorted(self._requests, key=lambda r: r.arrival_s)


class SSJFQueue(WaitingQueue):
    """Shortest predicted output first (ties by arrival), except that requests which have waited at least
    ``aging_threshold_s`` come first, oldest first: a long job is delayed by at most the threshold plus
    the work already admitted ahead of it."""

    def __init__(self, aging_threshold_s: float) -> None:
        super().__init__()
        self.aging_threshold_s = aging_threshold_s

    def ordered(self, now_s: float) -> list[Request]:
        by_arrival = sorted(self._requests, key=lambda r: r.arrival_s)
        starved = [r for r in by_arrival if now_s - r.arrival_s >= self.aging_threshold_s]
        rest = [r for r in by_arrival if now_s - r.arrival_s < self.aging_threshold_s]
        rest.sort(key=lambda r: r.sort_length)  # stable: equal predictions keep arrival order
        return starved + rest


def waiting_queue(config: SchedulerConfig) -> WaitingQueue:
    if config.queue_order is QueueOrder.SSJF:
        return SSJFQueue(config.aging_threshold_s)
    return FCFSQueue()


# ---- batching policies ------------------------------------------------------------------------------


class BatchingPolicy(ABC):
    def budget_tokens(self, config: SchedulerConfig, max_model_len: int) -> int:
        """Tokens one step may compute. Whole-prompt policies: enough for any prompt."""
        return max(config.chunk_size, max_model_len)

    @abstractmethod
    def fill(self, scheduler: Scheduler, plan: PlanBuilder, now_s: float) -> None:
        """Offer the plan's budget to requests through the scheduler's mechanisms."""


class Sarathi(BatchingPolicy):
    """Decode-maximal batching with chunked prefills: every running decode, then at most
    ``max_prefill_chunks`` prefill chunks filling the rest of ``chunk_size`` (stall-free batching)."""

    def budget_tokens(self, config: SchedulerConfig, max_model_len: int) -> int:
        return config.chunk_size

    def fill(self, scheduler: Scheduler, plan: PlanBuilder, now_s: float) -> None:
        scheduler.schedule_decodes(plan)
        scheduler.schedule_prefills(
            plan, now_s, max_chunks=scheduler.config.max_prefill_chunks, whole_prompts=False, admit_new=True
        )


class PrefillFirst(BatchingPolicy):
    """Whole prompts; a step that has a prompt to run does only prefills (vLLM v0, Orca)."""

    admits_new = True

    def fill(self, scheduler: Scheduler, plan: PlanBuilder, now_s: float) -> None:
        scheduler.schedule_prefills(
            plan,
            now_s,
            max_chunks=scheduler.config.max_num_seqs,
            whole_prompts=True,
            admit_new=self.admits_new,
        )
        if not plan.chunks:
            scheduler.schedule_decodes(plan)


class Batch(PrefillFirst):
    """Static batching (``wait_timeout_s`` None) or dynamic batching: when nothing runs, the next batch of
    up to ``max_num_seqs`` requests is admitted together (from one bin with ``group_by_bin``) and runs,
    prefill-first, until its last request finishes. Dynamic batching starts a partial batch once its
    oldest request has waited ``wait_timeout_s``."""

    admits_new = False

    def __init__(self, wait_timeout_s: float | None) -> None:
        self.wait_timeout_s = wait_timeout_s

    def fill(self, scheduler: Scheduler, plan: PlanBuilder, now_s: float) -> None:
        if not scheduler.running:
            self._start_batch(scheduler, now_s)
        super().fill(scheduler, plan, now_s)

    def _start_batch(self, scheduler: Scheduler, now_s: float) -> None:
        config = scheduler.config
        ordered = scheduler.waiting.ordered(now_s)
        if config.group_by_bin:
            by_bin: dict[int, list[Request]] = {}
            for request in ordered:  # bins in the order their best request is served
                by_bin.setdefault(request.bin_id, []).append(request)
            ordered = next(
                (members for members in by_bin.values() if self._is_ready(members, config, now_s)), []
            )
        elif ordered and not self._is_ready(ordered, config, now_s):
            return
        for request in ordered[: config.max_num_seqs]:
            scheduler.admit(request, now_s)

    def _is_ready(self, candidates: list[Request], config: SchedulerConfig, now_s: float) -> bool:
        if self.wait_timeout_s is None or len(candidates) >= config.max_num_seqs:
            return True
        oldest_arrival_s = min(r.arrival_s for r in candidates)
        return now_s - oldest_arrival_s >= self.wait_timeout_s


def batching_policy(config: SchedulerConfig) -> BatchingPolicy:
    makers = {
        SchedulerPolicy.SARATHI: Sarathi,
        SchedulerPolicy.PREFILL_FIRST: PrefillFirst,
        SchedulerPolicy.STATIC: lambda: Batch(wait_timeout_s=None),
        SchedulerPolicy.DYNAMIC: lambda: Batch(wait_timeout_s=config.batch_wait_timeout_s),
    }
    return makers[config.policy]()
