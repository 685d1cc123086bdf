"""Engine configuration: one frozen dataclass per concern, each checked once in ``__post_init__``.

Everything here is plain data (no torch, no ray), so the scheduler, the tests and the YAML layer share
it. A field that is out of range raises ``ValueError`` naming the field and the allowed range.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")


class SchedulerPolicy(str, enum.Enum):
    """How each iteration's batch is formed; ``pipeline/policies.py`` has one class per value."""

    SARATHI = "sarathi"
    PREFILL_FIRST = "prefill_first"
    STATIC = "static"
    DYNAMIC = "dynamic"


class QueueOrder(str, enum.Enum):
    """The order waiting requests are admitted in; ``pipeline/policies.py`` has one queue per value."""

    FCFS = "fcfs"
    SSJF = "ssjf"
    SSJF_BOUNDED = "ssjf_bounded"
    HRRN = "hrrn"
    EXPECTED_REMAINING = "expected_remaining"


class StagePlacement(str, enum.Enum):
    """Where one replica's pipeline stages go relative to each other (a Ray placement group strategy)."""

    PACK = "pack"
    """On as few nodes as will hold them: stage-to-stage transfers stay inside a node (NVLink, shared
    memory). Stages still spill onto other nodes when one node has too few free GPUs."""
    SPREAD = "spread"
    """On different nodes where there are enough (best effort): a replica whose stages each need a whole
    node's memory, or one that should not put every stage behind one node's failure."""


def to_enum(name: str, value: object, enum_cls: type[enum.Enum]) -> enum.Enum:
    """``value`` (a member or its string) as a member of ``enum_cls``; ``ValueError`` lists the choices."""
    try:
        return enum_cls(value)
    except ValueError:
        choices = ", ".join(m.value for m in enum_cls)
        raise ValueError(f"{name}: must be one of {choices}, got {value!r}") from None


def check_range(name: str, value: float, low: float | None = None, high: float | None = None) -> None:
    """Raise ``ValueError`` unless ``low <= value <= high`` (either bound may be open-ended)."""
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name}: must be in [{lo}, {hi}], got {value!r}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint to run, and how."""

    model_dir: str
    """A Hugging Face checkpoint directory: config.json, *.safetensors and the tokenizer files."""
    dtype: str = "auto"
    """Activation and weight dtype; ``auto`` is float32 on CPU and bfloat16 on CUDA."""
    device: str = "auto"
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available)."""
    max_model_len: int | None = None
    """Longest sequence (prompt plus output) served; defaults to the model's ``max_position_embeddings``."""
    length_probe: str | None = None
    """A directory holding a length probe for this model (``binserve predictor train-probe``): the last
    stage refines each decoding request's predicted output length from its hidden state. None: off."""

    def __post_init__(self) -> None:
        if not self.model_dir:
            raise ValueError("model_dir: must name a checkpoint directory, got an empty string")
        check_choice("dtype", self.dtype, DTYPES)
        if self.max_model_len is not None:
            check_range("max_model_len", self.max_model_len, 2)


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: a fixed pool of blocks, sized from a memory budget."""

    block_size: int = 16
    """Tokens per KV block."""
    kv_cache_bytes: int = 256 * 2**20
    """Bytes for the KV pool on CPU (all layers of this process's stage, keys and values)."""
    gpu_memory_fraction: float = 0.85
    """On CUDA: the share of the device's free memory, after weights are loaded, given to the KV pool."""
    num_blocks: int | None = None
    """Force the pool to exactly this many blocks (tests use it to exercise preemption)."""
    enable_prefix_caching: bool = True
    """Reuse the KV of full blocks whose prefix an earlier request computed (each block named by a hash
    of its parent's name and its tokens; unused cached blocks are evicted least recently freed first)."""

    def __post_init__(self) -> None:
        check_range("block_size", self.block_size, 1, 1024)
        check_range("kv_cache_bytes", self.kv_cache_bytes, 1)
        check_range("gpu_memory_fraction", self.gpu_memory_fraction, 0.01, 0.99)
        if self.num_blocks is not None:
            check_range("num_blocks", self.num_blocks, 1)


@dataclass(frozen=True)
class SchedulerConfig:
    """How each iteration's batch is formed and in which order waiting requests are served."""

    policy: SchedulerPolicy = SchedulerPolicy.SARATHI
    """``sarathi``: chunked prefills with decodes first under a token budget (stall-free).
    ``prefill_first``: whole prompts, prefill iterations preferred (vLLM v0 / Orca).
    ``static``: a batch is admitted together and runs until its last request finishes (Multi-Bin).
    ``dynamic``: like static, but a batch starts once full or once its oldest request waited the timeout."""
    chunk_size: int = 512
    """Token budget per iteration (SARATHI's chunk size). Whole-prompt policies use
    ``max(chunk_size, max_model_len)`` so any prompt fits one iteration."""
    max_num_seqs: int = 64
    """Most requests running at once; the batch size B of static and dynamic batching."""
    max_prefill_chunks: int = 1
    """Prefill chunks per SARATHI iteration; 1 is decode-maximal batching."""
    queue_order: QueueOrder = QueueOrder.FCFS
    """``fcfs`` by arrival; ``ssjf`` least predicted work first (``Request.predicted_work_tokens``) with a
    fixed aging threshold; ``ssjf_bounded`` the same with the wait bound instead; ``hrrn`` highest response
    ratio next, (wait + predicted service) / predicted service, with the wait bound; ``expected_remaining``
    least expected work first (``Request.expected_work_tokens``: the mean remaining output under the
    predicted length distribution, given the tokens generated so far) with the wait bound."""
    aging_threshold_s: float = 30.0
    """SSJF aging guard: requests that have waited this long are served first, oldest first."""
    service_s_per_token: float = 0.02
    """Seconds of a replica's time per token of a request's predicted work: turns predicted work into the
    predicted service time of ``hrrn`` and of the wait bound. About one step's time, since each output token
    costs its request a step (prompt tokens, many to a step, are overcharged): ~0.02 s for an 8B model on an
    H100, ~0.06 s for SmolLM2-135M on one CPU core."""
    max_wait_floor_s: float = 10.0
    """Wait bound of ``ssjf_bounded`` and ``hrrn``: no request waits for admission longer than
    max(max_wait_floor_s, max_wait_service_multiple x its predicted service time) while the load is below
    capacity. A request that has waited half its bound is served first (earliest bound first)."""
    max_wait_service_multiple: float = 4.0
    """The wait bound's multiple of a request's predicted service time (see ``max_wait_floor_s``)."""
    group_by_bin: bool = False
    """Static and dynamic batches are drawn from one bin only (Multi-Bin batching in one replica)."""
    batch_wait_timeout_s: float = 0.05
    """Dynamic batching: start a partial batch once its oldest request has waited this long."""
    reserve_predicted_output: bool = False
    """Admission also reserves KV blocks for each request's predicted remaining output (times 1 plus
    ``predicted_output_margin``), not only its prompt, so memory pressure causes fewer recompute
    preemptions. A reservation never exceeds the pool, so a lone request is always admitted."""
    predicted_output_margin: float = 0.25
    """Safety margin on predicted output lengths when ``reserve_predicted_output`` is on."""
    watermark_fraction: float = 0.01
    """Share of the KV pool that admitting a new request must leave free while others run, so newly
    admitted prompts do not at once force running decodes into preemption."""

    def __post_init__(self) -> None:
        # YAML and the CLI give strings: store members, so the scheduler never compares names.
        object.__setattr__(self, "policy", to_enum("policy", self.policy, SchedulerPolicy))
        object.__setattr__(self, "queue_order", to_enum("queue_order", self.queue_order, QueueOrder))
        check_range("chunk_size", self.chunk_size, 1)
        check_range("max_num_seqs", self.max_num_seqs, 1)
        check_range("max_prefill_chunks", self.max_prefill_chunks, 1)
        check_range("aging_threshold_s", self.aging_threshold_s, 0.0)
        check_range("service_s_per_token", self.service_s_per_token, 1e-6, 60.0)
        check_range("max_wait_floor_s", self.max_wait_floor_s, 0.0)
        check_range("max_wait_service_multiple", self.max_wait_service_multiple, 0.0)
        check_range("batch_wait_timeout_s", self.batch_wait_timeout_s, 0.0)
        check_range("watermark_fraction", self.watermark_fraction, 0.0, 0.5)
        check_range("predicted_output_margin", self.predicted_output_margin, 0.0, 10.0)


@dataclass(frozen=True)
class ParallelConfig:
    """How one replica is split across devices."""

    pp_size: int = 1
    """Pipeline stages, one worker (and one GPU, where there are GPUs) each."""
    torch_threads: int = 1
    """Intra-op threads per worker process on CPU."""
    stage_placement: StagePlacement = StagePlacement.PACK
    """``pack``: a replica's stages on as few nodes as possible; ``spread``: on different nodes where
    possible. Applies to the replica's placement group (its own bundle and one per stage)."""
    separate_model_process: bool = False
    """With ``pp_size`` 1, run the model in one stage actor, its own process, as ``pp_size`` > 1 always does,
    instead of in the replica's (or ``LLM``'s) process. A served replica's process also streams every
    request's tokens back; apart, that work no longer shares an interpreter lock with the forward pass."""

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "stage_placement", to_enum("stage_placement", self.stage_placement, StagePlacement)
        )
        check_range("pp_size", self.pp_size, 1, 64)
        check_range("torch_threads", self.torch_threads, 1, 256)

    @property
    def uses_stage_actors(self) -> bool:
        """The model runs in stage actors (``workers/pipeline_runner.py``), not in the calling process."""
        return self.pp_size > 1 or self.separate_model_process


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
