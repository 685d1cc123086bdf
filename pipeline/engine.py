"""The engine loop: ``add_request`` / ``abort`` / ``step`` on one injected runner.

    engine = Engine(runner, scheduler)
    engine.add_request(NewRequest("r1", prompt_token_ids, SamplingParams(max_tokens=32)))
    while engine.has_unfinished:
        for out in engine.step():
            print(out.request_id, out.new_token_ids, out.finish_reason)

Pure Python. The runner (a model in this process, a pipeline of stage actors, or a fake in tests) has
one interface, ``Runner``: ``submit`` a plan, ``collect`` the oldest plan's output, and ``depth`` plans
may be in flight. Each ``step`` tops the in-flight plans up to ``depth`` (scheduling new plans while the
runner works on older ones), then waits for the oldest and applies its tokens. Offline ``generate``, the
serving driver and the tests all run on it.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pipeline.plan import StepOutput, StepPlan
from pipeline.request import FinishReason, NewRequest, Request, SamplingParams
from pipeline.scheduler import Scheduler


class Runner(Protocol):
    """Executes plans: a model on a device, a pipeline of stage actors, or a fake in tests."""

    depth: int
    """How many plans may be in flight at once (1, or the number of pipeline stages)."""
    num_blocks: int
    """KV blocks of its paged cache (every stage holds the same number)."""
    vocab_size: int

    def submit(self, plan: StepPlan) -> None:
        """Start a plan without waiting for it."""

    def collect(self) -> StepOutput:
        """Wait for the oldest submitted plan's output (plans complete in submission order)."""


@dataclass(frozen=True)
class RequestMetrics:
    """A finished request's timeline (seconds on the engine's clock) and sizes."""

    arrival_s: float
    admitted_s: float | None
    token_times_s: tuple[float, ...]
    finished_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    num_preemptions: int
    predicted_output_tokens: int | None
    bin_id: int
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache."""

    @property
    def ttft_s(self) -> float | None:
        return self.token_times_s[0] - self.arrival_s if self.token_times_s else None

    @property
    def completion_s(self) -> float:
        """Job completion time: arrival to the last token (or the abort)."""
        return self.finished_s - self.arrival_s

    @property
    def queueing_s(self) -> float | None:
        return None if self.admitted_s is None else self.admitted_s - self.arrival_s

    @property
    def tbt_s(self) -> tuple[float, ...]:
        """Times between consecutive output tokens."""
        times = self.token_times_s
        return tuple(b - a for a, b in zip(times, times[1:], strict=False))

    @classmethod
    def of(cls, request: Request) -> RequestMetrics:
        assert request.finished_s is not None
        return cls(
            arrival_s=request.arrival_s,
            admitted_s=request.admitted_s,
            token_times_s=tuple(request.token_times_s),
            finished_s=request.finished_s,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            num_cached_tokens=request.num_cached_tokens,
            num_preemptions=request.num_preemptions,
            predicted_output_tokens=request.predicted_output_tokens,
            bin_id=request.bin_id,
        )


@dataclass(frozen=True)
class RequestOutput:
    """What a step produced for one request: its new token and, at the end, why and how it finished."""

    request_id: str
    new_token_ids: tuple[int, ...]
    num_output_tokens: int
    finish_reason: FinishReason | None = None
    metrics: RequestMetrics | None = None
    """Set on the final output."""
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache (known from the first output on)."""

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Completion:
    """A finished request, as ``Engine.generate`` returns it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    finish_reason: FinishReason
    metrics: RequestMetrics


StepObserver = Callable[[StepPlan, float], None]
"""Called with each completed plan and the seconds it took (for metrics); runs on the engine's thread."""


class Engine:
    def __init__(
        self, runner: Runner, scheduler: Scheduler, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.clock = clock
        self._in_flight: collections.deque[tuple[StepPlan, float]] = (
            collections.deque()
        )  # (plan, submit time)
        self._last_collected_s = 0.0
        self._step_observers: list[StepObserver] = []

    def add_step_observer(self, observer: StepObserver) -> None:
        self._step_observers.append(observer)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def max_model_len(self) -> int:
        return self.scheduler.max_model_len

    def add_request(self, new: NewRequest, arrival_s: float | None = None) -> Request:
        """Check a request against this engine and queue it. Bad input raises ``ValueError`` naming the
        field and changes nothing. The one duplicate-id check of the serving path is here."""
        if new.request_id in self.scheduler.requests:
            raise ValueError(f"request_id: {new.request_id!r} is already in use by an unfinished request")
        num_prompt_tokens = len(new.prompt_token_ids)
        if num_prompt_tokens >= self.max_model_len:
            raise ValueError(
                f"prompt: {num_prompt_tokens} tokens, must be at most {self.max_model_len - 1} "
                f"(max_model_len {self.max_model_len} minus one output token)"
            )
        vocab_size = self.runner.vocab_size
        bad = next((t for t in new.prompt_token_ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids: ids must be in [0, {vocab_size - 1}], got {bad}")
        request = Request.of(new, self.clock() if arrival_s is None else arrival_s)
        self.scheduler.add(request)
        return request

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks; False if it was not running or waiting."""
        return self.scheduler.abort(request_id, self.clock()) is not None

    def schedule(self) -> StepPlan:
        return self.scheduler.schedule(self.clock())

    def complete(self, plan: StepPlan, output: StepOutput) -> list[RequestOutput]:
        outputs = []
        for update in self.scheduler.update(plan, output, self.clock()):
            request = update.request
            outputs.append(
                RequestOutput(
                    request_id=request.request_id,
                    new_token_ids=(update.token_id,),
                    num_output_tokens=request.num_output_tokens,
                    finish_reason=update.finish_reason,
                    metrics=RequestMetrics.of(request) if update.finish_reason else None,
                    num_cached_tokens=request.num_cached_tokens,
                )
            )
        return outputs

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    def advance(self) -> list[RequestOutput] | None:
        """One loop turn: top the in-flight plans up to ``runner.depth`` (``fill``), then wait for the
        oldest and apply its tokens. None when nothing is in flight (no work, or a batch waiting to start).

        New plans are scheduled while the runner works on the older ones; the scheduler keeps each
        request in at most one in-flight plan."""
        self.fill()
        if not self._in_flight:
            return None
        return self._collect()

    def fill(self) -> None:
        """Schedule and submit plans until ``runner.depth`` are in flight or there is nothing to run. A
        caller may call it between ``advance`` and handing out its tokens, so that a runner in another
        process starts the next step at once (``EngineDriver``)."""
        while len(self._in_flight) < self.runner.depth:
            plan = self.schedule()
            if plan.is_empty:
                break
            self.runner.submit(plan)
            self._in_flight.append((plan, time.perf_counter()))

    def _collect(self) -> list[RequestOutput]:
        plan, submitted_s = self._in_flight.popleft()
        output = self.runner.collect()
        now_s = time.perf_counter()
        # A plan's step time: from when the runner could start on it (its submission, or the previous
        # plan's completion in a pipeline) to its completion.
        step_s = now_s - max(submitted_s, self._last_collected_s)
        self._last_collected_s = now_s
        for observer in self._step_observers:
            observer(plan, step_s)
        return self.complete(plan, output)

    def step(self) -> list[RequestOutput]:
        """``advance`` for callers that need not tell an idle engine from a step without new tokens."""
        return self.advance() or []

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
        predicted_output_tokens: Sequence[int | None] | None = None,
    ) -> list[Completion]:
        """Run prompts to completion together (offline use); results in prompt order. ``runner.depth``
        plans are in flight (``pp_size`` micro-batches through a pipeline)."""
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        predictions = list(predicted_output_tokens or [None] * len(prompts))
        requests = [
            self.add_request(NewRequest(f"generate-{id(self)}-{i}", tuple(prompt), p, pred))
            for i, (prompt, p, pred) in enumerate(zip(prompts, params_list, predictions, strict=True))
        ]
        while any(not r.is_finished for r in requests):
            if self.advance() is None:
                time.sleep(0.0005)  # e.g. dynamic batching waiting for its timeout
        while self._in_flight:  # plans of requests other callers added: apply them, leave nothing behind
            self._collect()
        return [
            Completion(
                request_id=r.request_id,
                prompt_token_ids=tuple(r.prompt_token_ids),
                output_token_ids=tuple(r.output_token_ids),
                finish_reason=r.finish_reason or FinishReason.ABORT,
                metrics=RequestMetrics.of(r),
            )
            for r in requests
        ]
