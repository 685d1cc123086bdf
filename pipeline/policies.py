"""The scheduler's policies as small objects: which requests a step offers tokens to, in which order.

Two kinds, chosen once from ``SchedulerConfig`` by ``batching_policy`` and ``waiting_queue``:

- **Batching policies** fill a step's plan through the scheduler's two mechanisms,
  ``schedule_decodes`` (one token for each running decode) and ``schedule_prefills`` (the next chunk of
  unfinished prompts, admitting new requests if allowed). ``Sarathi`` (decodes first, then one chunk,
  under ``chunk_size`` tokens), ``PrefillFirst`` (whole prompts; a step that can admit a prompt does
  only prefills: vLLM v0 / Orca) and ``Batch`` (static: a batch is admitted at once and runs to its last
  request; dynamic: it also starts once its oldest request has waited ``batch_wait_timeout_s``).
- **Waiting queues** order the requests that hold no KV blocks: ``FCFSQueue`` by arrival; ``SSJFQueue``
  least predicted work first with a fixed aging guard; ``BoundedSSJFQueue`` the same with aging tied to
  the job's size (``WaitBound``); ``HRRNQueue`` highest response ratio next under the same bound;
  ``ExpectedRemainingQueue`` least expected remaining work under the predicted length distribution.

Adding a policy is adding a class here and a member to the config's enum; the scheduler does not change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
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


class AgingQueue(WaitingQueue):
    """Requests that have waited past their aging limit first, earliest limit first; the rest by
    ``priority`` (smallest first; ties keep arrival order). Every order but FCFS is one of these: they
    differ only in the limit and the priority, and rank by ``Request.predicted_work_tokens`` (or its mean
    under the predicted length distribution, ``Request.expected_work_tokens``)."""

    @abstractmethod
    def aging_limit_s(self, request: Request) -> float:
        """How long the request may wait before it is served ahead of every priority."""

    @abstractmethod
    def priority(self, request: Request, now_s: float) -> float:
        """The request's rank among those not yet past their limit (smaller is served first)."""

    def ordered(self, now_s: float) -> list[Request]:
        by_arrival = sorted(self._requests, key=lambda r: r.arrival_s)
        limits = {r.request_id: r.arrival_s + self.aging_limit_s(r) for r in by_arrival}
        aged = [r for r in by_arrival if now_s >= limits[r.request_id]]
        rest = [r for r in by_arrival if now_s < limits[r.request_id]]
        aged.sort(key=lambda r: limits[r.request_id])
        rest.sort(key=lambda r: self.priority(r, now_s))  # stable: equal priorities keep arrival order
        return aged + rest


class SSJFQueue(AgingQueue):
    """Least predicted work first, except that requests which have waited at least ``aging_threshold_s``
    come first, oldest first: a long job is delayed by at most the threshold plus the work already
    admitted ahead of it."""

    def __init__(self, aging_threshold_s: float) -> None:
        super().__init__()
        self.aging_threshold_s = aging_threshold_s

    def aging_limit_s(self, request: Request) -> float:
        return self.aging_threshold_s

    def priority(self, request: Request, now_s: float) -> float:
        return request.predicted_work_tokens


@dataclass(frozen=True)
class WaitBound:
    """The longest a request should wait for admission: max(``floor_s``, ``service_multiple`` x its
    predicted service time), the service time being its predicted work times ``s_per_token``.

    A queue keeps it by serving a request first once it has waited half its bound; the other half is the
    headroom for a slot and blocks to free, which below capacity takes about one short job."""

    s_per_token: float
    floor_s: float
    service_multiple: float

    @classmethod
    def of(cls, config: SchedulerConfig) -> WaitBound:
        return cls(config.service_s_per_token, config.max_wait_floor_s, config.max_wait_service_multiple)

    def service_s(self, request: Request) -> float:
        return max(1, request.predicted_work_tokens) * self.s_per_token

    def max_wait_s(self, request: Request) -> float:
        return max(self.floor_s, self.service_multiple * self.service_s(request))


class BoundedSSJFQueue(AgingQueue):
    """Least predicted work first, with aging tied to the job's size: a request is served first once it has
    waited half its ``WaitBound`` (so a long job ages later than a short one, but always within its bound)."""

    def __init__(self, bound: WaitBound) -> None:
        super().__init__()
        self.bound = bound

    def aging_limit_s(self, request: Request) -> float:
        return self.bound.max_wait_s(request) / 2

    def priority(self, request: Request, now_s: float) -> float:
        return request.predicted_work_tokens


class HRRNQueue(BoundedSSJFQueue):
    """Highest response ratio next: (wait + predicted service) / predicted service, largest first (SGLang's
    HRRN). A fresh short job beats a fresh long one, and a job's ratio grows faster the shorter it is, so
    the long ones rise as they wait; the ``WaitBound`` aging caps what is left of their tail."""

    def priority(self, request: Request, now_s: float) -> float:
        service_s = self.bound.service_s(request)
        return -(now_s - request.arrival_s + service_s) / service_s


class ExpectedRemainingQueue(BoundedSSJFQueue):
    """Least expected work first: uncached prompt plus the mean output still to come under the request's
    predicted length distribution, given what it has generated (``Request.expected_work_tokens``), rather
    than the point prediction's remaining output. Only a preempted request has generated tokens while it
    waits; for a new one this is its mean length, which a heavy tail puts above the point. Same
    ``WaitBound`` aging as ``ssjf_bounded`` (on the point's predicted service)."""

    def priority(self, request: Request, now_s: float) -> float:
        return request.expected_work_tokens


def waiting_queue(config: SchedulerConfig) -> WaitingQueue:
    makers = {
        QueueOrder.FCFS: FCFSQueue,
        QueueOrder.SSJF: lambda: SSJFQueue(config.aging_threshold_s),
        QueueOrder.SSJF_BOUNDED: lambda: BoundedSSJFQueue(WaitBound.of(config)),
        QueueOrder.HRRN: lambda: HRRNQueue(WaitBound.of(config)),
        QueueOrder.EXPECTED_REMAINING: lambda: ExpectedRemainingQueue(WaitBound.of(config)),
    }
    return makers[config.queue_order]()


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
