"""The engine loop: ``add_request`` / ``abort`` / ``step``, on any runner that executes a ``StepPlan``.

    engine = Engine(runner, scheduler, vocab_size=tokenizer_vocab)
    engine.add_request("r1", prompt_token_ids, SamplingParams(max_tokens=32))
    while engine.has_unfinished:
        for out in engine.step():
            print(out.request_id, out.new_token_ids, out.finish_reason)

Pure Python: the runner (a model on a device, a pipeline of stage actors, or a fake in tests) is
injected. ``step`` is ``schedule`` + ``runner.execute`` + ``complete``. ``advance`` is the one loop turn
that keeps ``runner.depth`` micro-batches in flight on a ``PipelinedRunner`` (a pipeline of stage
actors); ``generate`` and the serving driver both run on it.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pipeline.plan import StepOutput, StepPlan
from pipeline.request import FinishReason, Request, SamplingParams
from pipeline.scheduler import Scheduler


class Runner(Protocol):
    def execute(self, plan: StepPlan) -> StepOutput: ...


class PipelinedRunner(Protocol):
    depth: int
    """How many plans may be in flight at once (the number of pipeline stages)."""

    def submit(self, plan: StepPlan) -> None:
        """Start a plan without waiting for it."""

    def collect(self) -> StepOutput:
        """Wait for the oldest submitted plan's output (plans complete in submission order)."""


class SerialRunner:
    """Adapts a blocking ``Runner`` (one process, all layers) to the pipelined interface, depth 1."""

    depth = 1

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self._pending: collections.deque[StepPlan] = collections.deque()

    def submit(self, plan: StepPlan) -> None:
        self._pending.append(plan)

    def collect(self) -> StepOutput:
        return self.runner.execute(self._pending.popleft())


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


class Engine:
    def __init__(
        self,
        runner: Runner,
        scheduler: Scheduler,
        vocab_size: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.vocab_size = vocab_size
        self.clock = clock

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def max_model_len(self) -> int:
        return self.scheduler.max_model_len

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        predicted_output_tokens: int | None = None,
        bin_id: int = 0,
        arrival_s: float | None = None,
    ) -> Request:
        """Validate and queue a request. Bad input raises ``ValueError`` and changes nothing."""
        self._validate(request_id, prompt_token_ids, predicted_output_tokens, bin_id)
        request = Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            arrival_s=self.clock() if arrival_s is None else arrival_s,
            predicted_output_tokens=predicted_output_tokens,
            bin_id=bin_id,
        )
        self.scheduler.add(request)
        return request

    def _validate(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        predicted_output_tokens: int | None,
        bin_id: int,
    ) -> None:
        if not request_id:
            raise ValueError("request_id: must be a non-empty string")
        if request_id in self.scheduler.requests:
            raise ValueError(f"request_id: {request_id!r} is already in use by an unfinished request")
        num_prompt_tokens = len(prompt_token_ids)
        if num_prompt_tokens == 0:
            raise ValueError("prompt: must have at least 1 token, got 0")
        if num_prompt_tokens >= self.max_model_len:
            raise ValueError(
                f"prompt: {num_prompt_tokens} tokens, must be at most {self.max_model_len - 1} "
                f"(max_model_len {self.max_model_len} minus one output token)"
            )
        if any(not 0 <= t < self.vocab_size for t in prompt_token_ids):
            bad = next(t for t in prompt_token_ids if not 0 <= t < self.vocab_size)
            raise ValueError(f"prompt_token_ids: ids must be in [0, {self.vocab_size - 1}], got {bad}")
        if predicted_output_tokens is not None and predicted_output_tokens < 0:
            raise ValueError(f"predicted_output_tokens: must be >= 0, got {predicted_output_tokens}")
        if bin_id < 0:
            raise ValueError(f"bin_id: must be >= 0, got {bin_id}")

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
                )
            )
        return outputs

    def step(self) -> list[RequestOutput]:
        plan = self.schedule()
        if plan.is_empty:
            return []
        return self.complete(plan, self.runner.execute(plan))

    def advance(
        self, runner: PipelinedRunner, in_flight: collections.deque[StepPlan]
    ) -> list[RequestOutput] | None:
        """One turn of the pipelined loop: top ``in_flight`` up to ``runner.depth`` plans, then wait for
        the oldest and apply its tokens. None when nothing is in flight (no work, or a batch waiting).

        New plans are scheduled while the runner works on the older ones; the scheduler keeps each
        request in at most one in-flight plan."""
        while len(in_flight) < runner.depth:
            plan = self.schedule()
            if plan.is_empty:
                break
            runner.submit(plan)
            in_flight.append(plan)
        if not in_flight:
            return None
        return self.complete(in_flight.popleft(), runner.collect())

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
        predicted_output_tokens: Sequence[int | None] | None = None,
        runner: PipelinedRunner | None = None,
    ) -> list[Completion]:
        """Run prompts to completion together (offline use); results in prompt order. With a pipelined
        ``runner`` (the engine's own runner, in pipelined form) ``runner.depth`` plans are in flight."""
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        predictions = list(predicted_output_tokens or [None] * len(prompts))
        requests = [
            self.add_request(f"generate-{id(self)}-{i}", prompt, p, predicted_output_tokens=pred)
            for i, (prompt, p, pred) in enumerate(zip(prompts, params_list, predictions, strict=True))
        ]
        runner = runner or SerialRunner(self.runner)
        in_flight: collections.deque[StepPlan] = collections.deque()
        while any(not r.is_finished for r in requests):
            if self.advance(runner, in_flight) is None:
                time.sleep(0.0005)  # e.g. dynamic batching waiting for its timeout
        while in_flight:  # plans of requests other callers added: apply them, leave nothing on the runner
            self.complete(in_flight.popleft(), runner.collect())
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
