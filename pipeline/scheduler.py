"""The scheduler: which tokens of which requests each step computes, under a token budget.

Pure Python. ``schedule(now_s)`` returns a frozen ``StepPlan``; ``update(plan, output, now_s)`` applies
the sampled tokens. Every policy is the same mechanism (advance ``num_computed_tokens`` under a budget,
grow block tables, preempt by recompute when the pool runs dry); the policies differ only in which
requests they offer tokens to:

- ``sarathi``: running decodes first (one token each), then the next chunk of a partly prefilled
  request, then chunks of new requests, at most ``max_prefill_chunks`` prefill chunks per step and
  never more than ``chunk_size`` tokens. Each step costs about the same compute (stall-free batching).
- ``prefill_first``: whole prompts, and a step that can admit a prompt does only prefills.
- ``static`` / ``dynamic``: a batch is admitted at once when nothing runs and runs to its last request
  (prefill-first inside the batch). ``dynamic`` waits for a full batch or ``batch_wait_timeout_s``.

With pipeline parallelism several plans are in flight; a request is in at most one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.block_manager import BlockManager
from pipeline.config import SchedulerConfig
from pipeline.plan import ScheduledChunk, StepOutput, StepPlan
from pipeline.queue_policy import order_waiting
from pipeline.request import FinishReason, Request, RequestStatus


@dataclass(frozen=True)
class TokenUpdate:
    """One request's new token from a step, and whether that finished it."""

    request: Request
    token_id: int
    finish_reason: FinishReason | None


class _PlanBuilder:
    def __init__(self, budget_tokens: int) -> None:
        self.budget_tokens = budget_tokens
        self.chunks: list[ScheduledChunk] = []
        self.requests: list[Request] = []
        self.preempted_ids: list[str] = []
        self.num_prefill_chunks = 0

    def take(self, request: Request, num_tokens: int) -> None:
        if not request.is_decoding:
            self.num_prefill_chunks += 1
        start = request.num_computed_tokens
        end = start + num_tokens
        completes = end == request.num_tokens
        self.chunks.append(
            ScheduledChunk(
                request_id=request.request_id,
                token_ids=tuple(request.token_ids[start:end]),
                start_pos=start,
                block_ids=tuple(request.block_ids),
                sampling=request.params if completes else None,
                output_index=request.num_output_tokens,
            )
        )
        self.requests.append(request)
        request.num_computed_tokens = end
        request.is_in_flight = True
        self.budget_tokens -= num_tokens

    def holds(self, request: Request) -> bool:
        return any(r is request for r in self.requests)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        eos_token_ids: tuple[int, ...],
    ) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.block_manager = BlockManager(num_blocks, block_size)
        # Admission keeps a few blocks back so newly admitted prompts do not immediately force
        # running decodes into preemption.
        self._num_watermark_blocks = num_blocks // 100
        self.waiting: list[Request] = []
        self.running: list[Request] = []  # in admission order: the newest is preempted first
        self.requests: dict[str, Request] = {}
        self._next_step_id = 0
        self._in_flight: dict[int, list[Request]] = {}  # step id -> its requests, in chunk order

    # ---- intake ---------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a request; the engine has validated it."""
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str, now_s: float) -> Request | None:
        request = self.requests.get(request_id)
        if request is not None:
            self._finish(request, FinishReason.ABORT, now_s)
        return request

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_in_flight_plans(self) -> int:
        return len(self._in_flight)

    # ---- planning -------------------------------------------------------------------------------

    def schedule(self, now_s: float) -> StepPlan:
        policy = self.config.policy
        if policy == "sarathi":
            plan = _PlanBuilder(self.config.chunk_size)
            self._schedule_decodes(plan)
            self._schedule_prefills(plan, now_s, whole_prompts=False)
        else:
            plan = _PlanBuilder(max(self.config.chunk_size, self.max_model_len))
            if policy in ("static", "dynamic") and not self.running:
                self._start_batch(now_s)
            self._schedule_prefills(plan, now_s, whole_prompts=True)
            if not plan.chunks:
                self._schedule_decodes(plan)
        step_id = self._next_step_id
        self._next_step_id += 1
        # Decodes are listed before prefill chunks, which the workers rely on to batch them together.
        order = sorted(range(len(plan.chunks)), key=lambda i: not plan.chunks[i].is_decode)
        if order:
            self._in_flight[step_id] = [plan.requests[i] for i in order]
        return StepPlan(step_id, tuple(plan.chunks[i] for i in order), tuple(plan.preempted_ids))

    def _schedule_decodes(self, plan: _PlanBuilder) -> None:
        for request in list(self.running):
            if plan.budget_tokens < 1:
                return
            if request.status is not RequestStatus.RUNNING or request.is_in_flight or not request.is_decoding:
                continue
            if self._grow_or_preempt(request, request.num_computed_tokens + 1, plan):
                plan.take(request, 1)

    def _schedule_prefills(self, plan: _PlanBuilder, now_s: float, whole_prompts: bool) -> None:
        """Offer the budget to unfinished prefills: running ones first, then (if allowed) new ones."""
        batch_mode = self.config.policy in ("static", "dynamic")
        max_chunks = self.config.max_prefill_chunks if not whole_prompts else self.config.max_num_seqs
        candidates = [r for r in self.running if not r.is_in_flight and not r.is_decoding]
        if not batch_mode:
            candidates += order_waiting(self.waiting, now_s, self.config)
        for request in candidates:
            if plan.budget_tokens < 1 or plan.num_prefill_chunks >= max_chunks:
                return
            is_new = request.status is RequestStatus.WAITING
            if is_new and len(self.running) >= self.config.max_num_seqs:
                return
            num_tokens = request.num_uncomputed_tokens
            if not whole_prompts:
                num_tokens = min(num_tokens, plan.budget_tokens)
            elif num_tokens > plan.budget_tokens:
                return
            end = request.num_computed_tokens + num_tokens
            reserved = self._num_watermark_blocks if is_new and self.running else 0
            if not self.block_manager.can_grow(request, end, reserved):
                if is_new:
                    return  # admit in strict queue order: the head of the line is not overtaken
                continue
            self.block_manager.grow(request, end)
            if is_new:
                self._admit(request, now_s)
            plan.take(request, num_tokens)

    def _start_batch(self, now_s: float) -> None:
        """Static/dynamic batching: at a batch boundary, admit the next batch (from one bin if grouping)."""
        ordered = order_waiting(self.waiting, now_s, self.config)
        if self.config.group_by_bin:
            by_bin: dict[int, list[Request]] = {}
            for request in ordered:  # bins in the order their best request is served
                by_bin.setdefault(request.bin_id, []).append(request)
            ordered = next((members for members in by_bin.values() if self._is_batch_ready(members, now_s)), [])
        elif ordered and not self._is_batch_ready(ordered, now_s):
            return
        for request in ordered[: self.config.max_num_seqs]:
            self._admit(request, now_s)

    def _is_batch_ready(self, candidates: list[Request], now_s: float) -> bool:
        if self.config.policy == "static" or len(candidates) >= self.config.max_num_seqs:
            return True
        oldest_arrival_s = min(r.arrival_s for r in candidates)
        return now_s - oldest_arrival_s >= self.config.batch_wait_timeout_s

    def _admit(self, request: Request, now_s: float) -> None:
        self.waiting.remove(request)
        self.running.append(request)
        request.status = RequestStatus.RUNNING
        if request.admitted_s is None:
            request.admitted_s = now_s

    def _grow_or_preempt(self, request: Request, num_tokens: int, plan: _PlanBuilder) -> bool:
        """Grow ``request`` to ``num_tokens`` positions, preempting the newest idle requests if needed."""
        while not self.block_manager.can_grow(request, num_tokens):
            victim = next(
                (
                    r
                    for r in reversed(self.running)
                    if r is not request and r.block_ids and not r.is_in_flight and not plan.holds(r)
                ),
                None,
            )
            if victim is None:
                return False
            self._preempt(victim, plan)
        self.block_manager.grow(request, num_tokens)
        return True

    def _preempt(self, request: Request, plan: _PlanBuilder) -> None:
        """Free the request's KV and send it back to wait; it recomputes its whole prefix later."""
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.running.remove(request)
        self.waiting.append(request)
        plan.preempted_ids.append(request.request_id)

    # ---- results --------------------------------------------------------------------------------

    def update(self, plan: StepPlan, output: StepOutput, now_s: float) -> list[TokenUpdate]:
        """Apply a step's sampled tokens; finish requests that hit a stop condition."""
        requests = self._in_flight.pop(plan.step_id, [])
        sampled = iter(output.sampled_token_ids)
        updates: list[TokenUpdate] = []
        for chunk, request in zip(plan.chunks, requests, strict=True):
            token_id = next(sampled) if chunk.sampling is not None else None
            if request.is_finished:
                continue  # aborted while its micro-batch was in flight
            request.is_in_flight = False
            if token_id is None:
                continue
            request.token_ids.append(token_id)
            request.token_times_s.append(now_s)
            reason = self._stop_reason(request, token_id)
            if reason is not None:
                self._finish(request, reason, now_s)
            updates.append(TokenUpdate(request, token_id, reason))
        return updates

    def _stop_reason(self, request: Request, token_id: int) -> FinishReason | None:
        params = request.params
        if token_id in self.eos_token_ids and not params.ignore_eos:
            return FinishReason.STOP
        if token_id in params.stop_token_ids:
            return FinishReason.STOP
        if request.num_output_tokens >= params.max_tokens or request.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, request: Request, reason: FinishReason, now_s: float) -> None:
        if request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        elif request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        self.block_manager.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.finished_s = now_s
        del self.requests[request.request_id]
