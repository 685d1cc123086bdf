"""A request's parameters and its state as the scheduler moves it from waiting to finished.

State follows one counter model (as in vLLM v1): a request holds ``token_ids`` (prompt then output)
and ``num_computed_tokens``, the prefix whose KV is in the cache. Prefill, chunked prefill, decode and
recompute after preemption are all "compute the next tokens of the prefix"; only the budget differs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pipeline.length_distribution import OutputLengthDistribution
from pipeline.sampling import FIELD_NAMES, FIELDS, check_sampling


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each output token and when to stop."""

    max_tokens: int = FIELDS["max_tokens"].default  # type: ignore[assignment]
    """Most output tokens; generation also stops at the model's context length."""
    temperature: float = FIELDS["temperature"].default  # type: ignore[assignment]
    """0 is greedy; higher flattens the distribution."""
    top_p: float = FIELDS["top_p"].default  # type: ignore[assignment]
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to at least this."""
    top_k: int = FIELDS["top_k"].default  # type: ignore[assignment]
    """Keep only the k most likely tokens; 0 keeps all."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever else is in the batch."""
    stop_token_ids: tuple[int, ...] = ()
    """Stop (and keep the token) when any of these is generated."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token (benchmarks force output lengths with it)."""
    repetition_penalty: float = FIELDS["repetition_penalty"].default  # type: ignore[assignment]
    """transformers' semantics: the logit of every token already in the prompt or the output is divided
    by this when positive and multiplied when negative; 1 is off."""
    presence_penalty: float = FIELDS["presence_penalty"].default  # type: ignore[assignment]
    """OpenAI's semantics: subtracted once from the logit of every token already in the output."""
    frequency_penalty: float = FIELDS["frequency_penalty"].default  # type: ignore[assignment]
    """OpenAI's semantics: subtracted from a token's logit once per time it is already in the output."""

    def __post_init__(self) -> None:
        check_sampling({name: getattr(self, name) for name in FIELD_NAMES})

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """Sampling needs the request's earlier tokens, not only the last position's logits."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(frozen=True)
class NewRequest:
    """A request as it enters an engine, carried unchanged from the ingress to the scheduler.

    Checked here for what needs no engine (ids, emptiness, signs); ``Engine.add_request`` checks what
    does (context length, vocabulary, duplicate ids)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    predicted_output_tokens: int | None = None
    """The length predictor's guess (or an oracle's); SSJF orders by it."""
    bin_id: int = 0
    """The router's bin; static and dynamic batches can be drawn from one bin."""
    prompt_block_names: tuple[int, ...] = ()
    """The names of the prompt's cacheable blocks (``pipeline.block_manager.prompt_block_names``), hashed
    once by the ingress so the replica router can find where the prompt's prefix is cached; empty when
    prefix caching is off. The engine names its blocks itself."""
    output_length_distribution: OutputLengthDistribution | None = None
    """How far the true length tends to fall from ``predicted_output_tokens`` (the predictor's quantiles of
    true / predicted); the ``expected_remaining`` order ranks by it. None: the point prediction alone."""

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("request_id: must be a non-empty string")
        if not self.prompt_token_ids:
            raise ValueError("prompt: must have at least 1 token, got 0")
        if self.predicted_output_tokens is not None and self.predicted_output_tokens < 0:
            raise ValueError(f"predicted_output_tokens: must be >= 0, got {self.predicted_output_tokens}")
        if self.bin_id < 0:
            raise ValueError(f"bin_id: must be >= 0, got {self.bin_id}")

    @property
    def predicted_work_tokens(self) -> int:
        """Tokens this request will cost a replica by the prediction: its prompt to prefill plus its predicted
        output (``max_tokens`` without one); ``Request.predicted_work_tokens`` counts down from it."""
        predicted = (
            self.params.max_tokens if self.predicted_output_tokens is None else self.predicted_output_tokens
        )
        return len(self.prompt_token_ids) + predicted

    @property
    def expected_work_tokens(self) -> int:
        """``predicted_work_tokens`` with the mean output under ``output_length_distribution`` in place of
        the point (the same without one): what the replica router counts for a request it sends
        (``Request.expected_work_tokens`` counts down from it)."""
        spread = self.output_length_distribution
        if spread is None or self.predicted_output_tokens is None:
            return self.predicted_work_tokens
        mean = spread.expected_remaining_tokens(self.predicted_output_tokens, 0)
        return len(self.prompt_token_ids) + max(1, round(mean))


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # end-of-sequence or a stop token
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # cancelled by the caller


@dataclass(eq=False)
class Request:
    """One request's mutable state. Only the scheduler changes it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_s: float
    predicted_output_tokens: int | None = None
    """The length predictor's guess (or an oracle's); SSJF orders by it."""
    bin_id: int = 0
    """The router's bin; static and dynamic batches can be drawn from one bin."""
    output_length_distribution: OutputLengthDistribution | None = None
    """The predicted length's spread (``NewRequest.output_length_distribution``)."""

    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    is_in_flight: bool = False
    """Part of a micro-batch that has been planned but whose output has not come back yet."""
    num_preemptions: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens whose KV the prefix cache already held: as looked up on arrival while the request
    waits, then as found when it was first admitted (what its usage reports)."""
    refined_output_tokens: int | None = None
    """The whole output's length as predicted while decoding (a probe on the model's hidden states)."""
    admitted_s: float | None = None
    """When the request first got KV blocks (end of its queueing delay)."""
    token_times_s: list[float] = field(default_factory=list)
    """When each output token was produced; the first is the time to first token."""
    finished_s: float | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @classmethod
    def of(cls, new: NewRequest, arrival_s: float) -> Request:
        return cls(
            request_id=new.request_id,
            prompt_token_ids=list(new.prompt_token_ids),
            params=new.params,
            arrival_s=arrival_s,
            predicted_output_tokens=new.predicted_output_tokens,
            bin_id=new.bin_id,
            output_length_distribution=new.output_length_distribution,
        )

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """Only the newest token is missing from the cache: the next step is a single-token decode."""
        return self.num_output_tokens > 0 and self.num_uncomputed_tokens == 1

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def predicted_total_output_tokens(self) -> int:
        """The best guess of this request's whole output: the refined prediction made while it decoded,
        else the prompt-only one, else ``max_tokens``."""
        for guess in (self.refined_output_tokens, self.predicted_output_tokens):
            if guess is not None:
                return guess
        return self.params.max_tokens

    @property
    def predicted_remaining_tokens(self) -> int:
        """Output tokens still to come by that guess; at least 1 while unfinished (a request that outlived
        its prediction still holds a slot)."""
        return max(1, self.predicted_total_output_tokens - self.num_output_tokens)

    @property
    def num_uncached_prompt_tokens(self) -> int:
        """Prompt tokens neither prefilled nor found in the prefix cache (after a preemption, those beyond the
        first admission's cache hit)."""
        num_prefilled = max(self.num_computed_tokens, self.num_cached_tokens)
        return max(0, self.num_prompt_tokens - num_prefilled)

    @property
    def predicted_work_tokens(self) -> int:
        """A request's predicted service, the one definition every queue order, the replica router, the
        autoscaler and the simulator use: uncached prompt tokens plus predicted remaining output."""
        return self.num_uncached_prompt_tokens + self.predicted_remaining_tokens

    @property
    def expected_remaining_tokens(self) -> float:
        """The mean output still to come given the tokens generated so far, E[L - g | L > g], under the
        request's length distribution located at ``predicted_total_output_tokens`` (so the length probe's
        refinement shifts it); at least 1 while unfinished. Without a distribution: the point's remaining."""
        spread = self.output_length_distribution
        if spread is None:
            return self.predicted_remaining_tokens
        expected = spread.expected_remaining_tokens(
            self.predicted_total_output_tokens, self.num_output_tokens
        )
        return max(1.0, expected)

    @property
    def expected_work_tokens(self) -> float:
        """``predicted_work_tokens`` with the expected remaining output in place of the point's: uncached
        prompt tokens plus ``expected_remaining_tokens``."""
        return self.num_uncached_prompt_tokens + self.expected_remaining_tokens
