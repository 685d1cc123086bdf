"""The scheduler: which tokens of which requests each step computes, under a token budget.

Pure Python. ``schedule(now_s)`` returns a frozen ``StepPlan``; ``update(plan, output, now_s)`` applies
the sampled tokens. Every policy is the same mechanism (advance ``num_computed_tokens`` under a budget,
grow block tables, preempt by recompute when the pool runs dry); a policy object
(``pipeline/policies.py``) only decides which requests are offered tokens, and a waiting-queue object in
which order new ones are admitted.

Liveness (no state with unfinished requests stops making progress, at any pipeline depth):

- Admission reserves a new request's whole prompt (less its cached prefix, counting the cached blocks
  it takes off the free list), beyond what the running prefills still need to
  finish theirs and a watermark, not only its first chunk; so admitted prefills can complete.
- Growth that finds the pool dry preempts an idle request admitted *after* the one growing (the one
  with the longest predicted remaining output, the newest among equals).
  The oldest running request can therefore always take what it needs once the micro-batches in flight
  return, and the pool holds at least one whole sequence (``Engine`` checks it), so it finishes.

With pipeline parallelism several plans are in flight; a request is in at most one of them.

Prefix caching (``BlockManager``) is invisible here but for one number: a request admitted (new, or
resumed after preemption) starts with ``num_computed_tokens`` at its cached prefix's length, so the token
budget, admission's reservation and the predicted work count only uncached tokens. When a plan comes back,
the full blocks it wrote are named for sharing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.block_manager import BlockManager
from pipeline.config import SchedulerConfig
from pipeline.plan import ScheduledChunk, StepOutput, StepPlan
from pipeline.policies import batching_policy, waiting_queue
from pipeline.request import FinishReason, Request, RequestStatus


@dataclass(frozen=True)
class TokenUpdate:
    """One request's new token from a step, and whether that finished it."""

    request: Request
    token_id: int
    finish_reason: FinishReason | None


class PlanBuilder:
    """A step's plan while policies fill it: chunks taken so far and the budget left."""

    def __init__(self, budget_tokens: int) -> None:
        self.budget_tokens = budget_tokens
        self.chunks: list[ScheduledChunk] = []
        self.requests: list[Request] = []
        self.preempted_ids: list[str] = []
        self.num_prefill_chunks = 0

    def take(self, request: Request, num_tokens: int) -> None:
        is_decode = request.is_decoding
        if not is_decode:
            self.num_prefill_chunks += 1
        start = request.num_computed_tokens
        end = start + num_tokens
        params = request.params if end == request.num_tokens else None  # completes the prefix: sample
        self.chunks.append(
            ScheduledChunk(
                request_id=request.request_id,
                token_ids=tuple(request.token_ids[start:end]),
                start_pos=start,
                block_ids=tuple(request.block_ids),
                sampling=params,
                output_index=request.num_output_tokens,
                is_decode=is_decode,
                # Penalties look at earlier tokens; only then does the plan carry them.
                history_token_ids=tuple(request.token_ids) if params and params.has_penalties else (),
                num_prompt_tokens=request.num_prompt_tokens,
            )
        )
        self.requests.append(request)
        request.num_computed_tokens = end
        request.is_in_flight = True
        self.budget_tokens -= num_tokens


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        eos_token_ids: tuple[int, ...],
        enable_prefix_caching: bool = False,
    ) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.policy = batching_policy(config)
        self.waiting = waiting_queue(config)
        self.running: list[Request] = []  # in admission order: the newest is preempted first
        self.requests: dict[str, Request] = {}
        self._num_watermark_blocks = int(num_blocks * config.watermark_fraction)
        self.num_preemptions = 0
        """Preemptions since the scheduler started (each frees a request's KV for a later recompute)."""
        self._next_step_id = 0
        self._in_flight: dict[int, list[Request]] = {}  # step id -> its requests, in chunk order

    # ---- intake ---------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a request; the engine has validated it. Its cached prefix as of now estimates its work."""
        request.num_cached_tokens = (
            len(self.block_manager.cached_prefix(request)) * self.block_manager.block_size
        )
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def abort(self, request_id: str, now_s: float) -> Request | None:
        request = self.requests.get(request_id)
        if request is not None:
            self._finish(request, FinishReason.ABORT, now_s)
        return request

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- planning -------------------------------------------------------------------------------

    def schedule(self, now_s: float) -> StepPlan:
        plan = PlanBuilder(self.policy.budget_tokens(self.config, self.max_model_len))
        self.policy.fill(self, plan, now_s)
        step_id = self._next_step_id
        self._next_step_id += 1
        # Decodes are listed before prefill chunks, which the workers rely on to batch them together.
        order = sorted(range(len(plan.chunks)), key=lambda i: not plan.chunks[i].is_decode)
        if order:
            self._in_flight[step_id] = [plan.requests[i] for i in order]
        return StepPlan(step_id, tuple(plan.chunks[i] for i in order), tuple(plan.preempted_ids))

    def schedule_decodes(self, plan: PlanBuilder) -> None:
        """One token for every running decode that is not in flight, while the budget lasts."""
        for request in list(self.running):
            if plan.budget_tokens < 1:
                return
            if request.status is not RequestStatus.RUNNING or request.is_in_flight or not request.is_decoding:
                continue
            if self._grow_or_preempt(request, request.num_computed_tokens + 1, plan):
                plan.take(request, 1)

    def schedule_prefills(
        self, plan: PlanBuilder, now_s: float, max_chunks: int, whole_prompts: bool, admit_new: bool
    ) -> None:
        """Offer the budget to unfinished prefills: running ones first, then (if ``admit_new``) waiting
        ones in queue order. ``whole_prompts``: a prompt is computed in one chunk or not at all."""
        candidates = [r for r in self.running if not r.is_in_flight and not r.is_decoding]
        if admit_new:
            candidates += self.waiting.ordered(now_s)
        for request in candidates:
            if plan.budget_tokens < 1 or plan.num_prefill_chunks >= max_chunks:
                return
            is_new = request.status is RequestStatus.WAITING
            if is_new and len(self.running) >= self.config.max_num_seqs:
                return
            cached_block_ids = self.block_manager.cached_prefix(request) if is_new else []
            num_tokens = request.num_uncomputed_tokens - len(cached_block_ids) * self.block_manager.block_size
            if not whole_prompts:
                num_tokens = min(num_tokens, plan.budget_tokens)
            elif num_tokens > plan.budget_tokens:
                return
            if is_new:
                if not self._can_admit(request, cached_block_ids):
                    return  # admit in strict queue order: the head of the line is not overtaken
                self.admit(request, now_s, cached_block_ids)
                self.block_manager.grow(request, request.num_computed_tokens + num_tokens)
            elif not self._grow_or_preempt(request, request.num_computed_tokens + num_tokens, plan):
                continue
            plan.take(request, num_tokens)

    def _can_admit(self, request: Request, cached_block_ids: list[int]) -> bool:
        """Whether the request's reservation fits beside the running requests' and the watermark: the
        blocks beyond its cached prefix, plus the cached blocks it takes off the free list."""
        num_reserved = sum(self._num_reserved_blocks(r) for r in self.running)
        if self.running:
            num_reserved += self._num_watermark_blocks
        num_needed = max(0, self._num_reserved_blocks(request) - len(cached_block_ids))
        num_needed += self.block_manager.num_taken_from_free(cached_block_ids)
        return num_needed <= self.block_manager.num_free_blocks - num_reserved

    def _num_reserved_blocks(self, request: Request) -> int:
        """Blocks a request is still owed: the rest of its prompt (all of it after a preemption) and, with
        ``reserve_predicted_output``, its predicted remaining output with the margin; never beyond the pool.
        Running decodes are owed nothing unless their output is reserved."""
        config = self.config
        if config.reserve_predicted_output:
            margin = 1.0 + config.predicted_output_margin
            num_tokens = request.num_tokens + math.ceil(request.predicted_remaining_tokens * margin)
        elif request.is_decoding:
            return 0
        else:
            num_tokens = request.num_tokens
        num_missing = self.block_manager.num_missing_blocks(request, min(num_tokens, self.max_model_len))
        return min(num_missing, self.block_manager.num_blocks)

    def admit(self, request: Request, now_s: float, cached_block_ids: list[int] | None = None) -> None:
        """Move a waiting request to running holding its cached prefix (``cached_block_ids``, looked up
        here if not given), computed from there; the rest of its blocks are grown when it is scheduled."""
        if cached_block_ids is None:
            cached_block_ids = self.block_manager.cached_prefix(request)
        self.block_manager.take(request, cached_block_ids)
        request.num_computed_tokens = len(cached_block_ids) * self.block_manager.block_size
        self.waiting.remove(request)
        self.running.append(request)
        request.status = RequestStatus.RUNNING
        if request.admitted_s is None:
            request.admitted_s = now_s
            request.num_cached_tokens = request.num_computed_tokens
            self.block_manager.count_lookup(request.num_prompt_tokens, request.num_cached_tokens)

    def _grow_or_preempt(self, request: Request, num_tokens: int, plan: PlanBuilder) -> bool:
        """Grow ``request`` to ``num_tokens`` positions, preempting the newest idle requests admitted after
        it if needed; False (nothing changed but preemptions) when that is not enough yet."""
        while not self.block_manager.can_grow(request, num_tokens):
            victim = self._victim_after(request)
            if victim is None:
                return False
            self._preempt(victim, plan)
        self.block_manager.grow(request, num_tokens)
        return True

    def _victim_after(self, request: Request) -> Request | None:
        """The idle request holding blocks, admitted after ``request``, with the longest predicted
        remaining output (the newest among equals); None if there is none."""
        position = next(i for i, r in enumerate(self.running) if r is request)
        candidates = [
            (r.predicted_remaining_tokens, i, r)
            for i, r in enumerate(self.running[position + 1 :], start=position + 1)
            if r.block_ids and not r.is_in_flight
        ]
        return max(candidates, key=lambda c: c[:2])[2] if candidates else None

    def _preempt(self, request: Request, plan: PlanBuilder) -> None:
        """Free the request's KV and send it back to wait; it recomputes its whole prefix later."""
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.running.remove(request)
        self.waiting.add(request)
        plan.preempted_ids.append(request.request_id)

    # ---- results --------------------------------------------------------------------------------

    def update(self, plan: StepPlan, output: StepOutput, now_s: float) -> list[TokenUpdate]:
        """Apply a step's sampled tokens; finish requests that hit a stop condition."""
        requests = self._in_flight.pop(plan.step_id, [])
        sampled = iter(output.sampled_token_ids)
        refined = iter(output.refined_output_tokens or (None,) * len(output.sampled_token_ids))
        updates: list[TokenUpdate] = []
        for chunk, request in zip(plan.chunks, requests, strict=True):
            token_id = next(sampled) if chunk.sampling is not None else None
            refined_output_tokens = next(refined) if chunk.sampling is not None else None
            if request.is_finished:
                continue  # aborted while its micro-batch was in flight
            request.is_in_flight = False
            self.block_manager.name_full_blocks(request, chunk.end_pos)
            if token_id is None:
                continue
            if refined_output_tokens is not None:
                request.refined_output_tokens = refined_output_tokens
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
        self.block_manager.forget(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.finished_s = now_s
        del self.requests[request.request_id]
