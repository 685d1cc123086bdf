"""The serving application's configuration: the YAML ``args`` parsed into frozen dataclasses, checked here.

    config = AppConfig.from_args({"model": {"model_dir": ".models/tiny-llama"}, "router": {"num_bins": 2}})

``args`` has one section per concern; the engine's sections are ``pipeline.config``'s own dataclasses:

    model:     ModelConfig      model_dir (required), dtype, device, max_model_len
    cache:     CacheConfig      block_size, kv_cache_bytes, gpu_memory_fraction, num_blocks
    scheduler: SchedulerConfig  policy, chunk_size (the token budget), max_num_seqs, queue_order (ssjf here)
    parallel:  ParallelConfig   pp_size, torch_threads
    router:    RouterConfig     num_bins, num_pools
    predictor: PredictorConfig  path, max_batch_size, batch_wait_timeout_s, num_cpus
    pools:     PoolConfig       replicas, autoscaling bounds, queue limit, resources, replica routing, streaming
    ingress:   IngressConfig    request limits, API key, replicas, resources
    sampling:  SamplingDefaultsConfig  what a request that leaves a field unset gets (over the model's)
    metrics:   MetricsConfig    export the binserve_* metrics or not, and how often replicas sample gauges

A wrong field is a ``ValueError`` naming it with its section (``scheduler.chunk_size: must be in [1, inf],
got 0``); an unknown field names the known ones. No ray or torch imports: the CLI and tests use this alone.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from pipeline.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    check_range,
    to_enum,
)
from pipeline.sampling import check_sampling


class ReplicaRouting(str, enum.Enum):
    """How a pool's callers pick one of its replicas for a request."""

    LEAST_PREDICTED_WORK = "least_predicted_work"
    """The replica with the fewest predicted tokens still to compute (``cluster/replica_router.py``)."""
    POWER_OF_TWO = "power_of_two"
    """Serve's default: the shorter queue of two random replicas (length-blind)."""
    LEAST_COST = "least_cost"
    """The least prefill still to compute there (prompt tokens minus the cached prefix the replica holds)
    plus predicted work waited behind: cache- and length-aware (``cluster.router.least_cost``)."""
    PREFIX_AFFINITY = "prefix_affinity"
    """Ray Serve LLM's ``PrefixCacheAffinityRouter`` rule: the longest cached prefix, the least loaded
    replica when loads are imbalanced (cache-aware, length-blind; ``cluster.router.prefix_affinity``)."""


@dataclass(frozen=True)
class RouterConfig:
    num_bins: int = 2
    """Equal-mass bins of predicted output length (Multi-Bin batching); boundaries come from the predictor:
    the quantiles of its own predictions of the workload's prompts (``binserve predictor cut-bins``)."""
    num_pools: int | None = None
    """Engine pools the bins are spread over, contiguous bins per pool; default one pool per bin."""
    pool_affinity_min_cached_tokens: int | None = 32
    """With several pools and prefix caching: a request stays in another pool than its bin's when the
    ingress sent that pool at least this many more of its prompt's first tokens (in whole blocks) than
    its bin's pool, so they are likely cached there and recomputed if it moved, and its bin is within
    ``pool_affinity_max_bin_distance`` of one that pool serves. The default, two blocks, keeps a
    conversation with its history from its second turn on. null: every request goes to its bin's pool."""
    pool_affinity_max_bin_distance: int = 1
    """How many bins from the ones its pool serves a request may be predicted and still stay there."""

    def __post_init__(self) -> None:
        check_range("num_bins", self.num_bins, 1, 64)
        if self.num_pools is not None:
            check_range("num_pools", self.num_pools, 1, self.num_bins)
        if self.pool_affinity_min_cached_tokens is not None:
            check_range("pool_affinity_min_cached_tokens", self.pool_affinity_min_cached_tokens, 1)
        check_range("pool_affinity_max_bin_distance", self.pool_affinity_max_bin_distance, 0, 64)

    @property
    def resolved_num_pools(self) -> int:
        return self.num_pools or self.num_bins


class PredictorPlacement(str, enum.Enum):
    """Where the prompt-only length predictor runs."""

    INGRESS = "ingress"
    DEPLOYMENT = "deployment"


INGRESS_HEADROOM = 64
"""Calls one ingress replica accepts beyond its admission bound, to refuse them itself."""
DEFAULT_PROBE = "default"
"""``model.length_probe: default``: the length probe shipped for the default model (SmolLM2)."""


@dataclass(frozen=True)
class PredictorConfig:
    path: str | None = None
    """A trained predictor directory; ``None`` loads the default predictor shipped in the repository."""
    placement: PredictorPlacement = PredictorPlacement.INGRESS
    """Where the prompt-only predictor runs: ``ingress`` (in each ingress replica's process: no hop) or
    ``deployment`` (its own Serve deployment, batched with ``@serve.batch``; ``num_replicas``,
    ``num_cpus`` and ``batch_wait_timeout_s`` apply to it)."""
    max_batch_size: int = 32
    """Most prompts predicted in one call; concurrent requests are batched up to this."""
    batch_wait_timeout_s: float = 0.005
    """How long the first prompt of a batch waits for company."""
    num_replicas: int = 1
    num_cpus: float = 0.5
    encoder_precision: str = "int8"
    """``int8`` (the encoder's Linear layers as int8 weights, one scale per channel: about 0.6x the float32
    time at batch 1, held-out Spearman within 0.01 of it; docs/PREDICTOR.md) or ``float32`` (as trained)."""
    max_prompt_tokens: int | None = None
    """Word pieces of each prompt the encoder reads (head and tail); null: the predictor's trained value."""
    torch_threads: int = 1
    """Torch threads of the process that runs the predictor (the ingress's, or the deployment's)."""
    cache_size: int = 4096
    """Prompts whose predictions are kept (least recently used out; 0: none). A chat resends its last user
    message with every retry, and a repeated prompt then costs a dictionary lookup, not an encoder call."""

    def __post_init__(self) -> None:
        from cluster.predictor import check_encoder_options

        if self.path is not None and not self.path:
            raise ValueError("path: must name a predictor directory or be null for the default")
        check_encoder_options(self.encoder_precision, self.max_prompt_tokens)
        check_range("torch_threads", self.torch_threads, 1, 256)
        check_range("cache_size", self.cache_size, 0, 1_000_000)
        object.__setattr__(self, "placement", to_enum("placement", self.placement, PredictorPlacement))
        check_range("max_batch_size", self.max_batch_size, 1, 4096)
        check_range("batch_wait_timeout_s", self.batch_wait_timeout_s, 0.0, 10.0)
        check_range("num_replicas", self.num_replicas, 1)
        check_range("num_cpus", self.num_cpus, 0.0)


@dataclass(frozen=True)
class PoolConfig:
    """Every engine pool's replicas: each replica owns one engine (``pp_size`` stages)."""

    min_replicas: int = 1
    max_replicas: int = 1
    """Autoscaling bounds; equal bounds mean a fixed number of replicas and no autoscaling."""
    target_outstanding_tokens: int = 8192
    """Autoscaling target: predicted output tokens still to generate per replica (queued plus running)."""
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 120.0
    look_back_period_s: float = 10.0
    """Window over which each replica's reports are averaged."""
    max_queued_requests: int = 256
    """Unfinished requests one replica holds (its SSJF queue plus its running batch); more are refused
    with RESOURCE_EXHAUSTED."""
    num_cpus: float = 1.0
    """CPUs of each replica actor: it runs the model when ``pp_size`` is 1, only the scheduler loop
    otherwise (each stage actor then reserves its own: a GPU, or ``torch_threads`` CPUs)."""
    num_gpus: float = 0.0
    """GPUs of each replica actor when ``pp_size`` is 1 (1 on GPU hosts); unused with pipeline stages."""
    replica_routing: ReplicaRouting = ReplicaRouting.LEAST_PREDICTED_WORK
    """How a request picks one of its pool's replicas: ``least_predicted_work`` (the replica with the fewest
    tokens still to prefill plus predicted output tokens still to generate), ``least_cost`` (that plus the
    prompt tokens the replica does not hold in its prefix cache), ``prefix_affinity`` (Ray Serve LLM's rule:
    the longest cached prefix unless loads are imbalanced) or ``power_of_two`` (Serve's default: the
    shorter queue of two random replicas)."""
    routing_stats_period_s: float = 0.5
    """How often each replica reports its predicted work and cached blocks to the callers (every rule but
    ``power_of_two``); between reports a caller adds the requests it sent."""
    stream_interval_s: float = 0.0
    """Least seconds between two streamed messages of one request after its first token. 0 (the default):
    a replica sends a request's new tokens whenever its caller has taken the previous ones, so a caller
    that keeps up gets every token at once and one that falls behind gets fewer, larger messages."""
    max_buffered_tokens: int = 1024
    """Tokens of one request a replica holds for a caller that has stopped taking them; beyond them the
    request is aborted (its KV blocks freed) and the call fails with RESOURCE_EXHAUSTED."""

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "replica_routing", to_enum("replica_routing", self.replica_routing, ReplicaRouting)
        )
        check_range("routing_stats_period_s", self.routing_stats_period_s, 0.05, 60.0)
        check_range("stream_interval_s", self.stream_interval_s, 0.0, 10.0)
        check_range("max_buffered_tokens", self.max_buffered_tokens, 1)
        check_range("min_replicas", self.min_replicas, 0)
        check_range("max_replicas", self.max_replicas, max(1, self.min_replicas))
        check_range("target_outstanding_tokens", self.target_outstanding_tokens, 1)
        check_range("upscale_delay_s", self.upscale_delay_s, 0.0)
        check_range("downscale_delay_s", self.downscale_delay_s, 0.0)
        check_range("look_back_period_s", self.look_back_period_s, 0.1)
        check_range("max_queued_requests", self.max_queued_requests, 1)
        check_range("num_cpus", self.num_cpus, 0.0)
        check_range("num_gpus", self.num_gpus, 0.0)

    @property
    def is_autoscaling(self) -> bool:
        return self.min_replicas != self.max_replicas


@dataclass(frozen=True)
class IngressConfig:
    """Request limits and access, checked at the ingress for gRPC and HTTP alike (INVALID_ARGUMENT / 400
    naming the limit), before anything is tokenized or predicted."""

    max_output_tokens: int = 4096
    """Largest ``max_tokens`` a request may ask for (and the default's cap)."""
    max_stop_strings: int = 16
    """Most ``stop`` strings per request."""
    max_stop_string_chars: int = 256
    """Longest ``stop`` string, in characters."""
    max_prompt_chars: int = 262_144
    """Longest prompt, in characters (a conversation: its messages' contents together); checked before
    tokenizing, so a huge body costs no tokenizer time."""
    max_prompt_tokens: int | None = None
    """Longest prompt in tokens (a conversation: as rendered); ``None``: the context length minus one."""
    max_messages: int = 256
    """Most messages in a conversation."""
    api_key: str | None = None
    """Callers must send ``authorization: Bearer <api_key>`` (gRPC metadata, HTTP header). ``None``: the
    ``BINSERVE_API_KEY`` environment variable of the ingress replica, if set; else no key is needed."""
    num_replicas: int = 1
    max_replicas_per_node: int | None = None
    """Most ingress replicas Serve places on one node (Serve's option of that name, 1-100); 1 puts each
    replica on its own node, so that one node's loss leaves the others serving (needs ``num_replicas``
    nodes with room). ``None``: no bound (Serve spreads them where it can, best effort)."""
    num_cpus: float = 0.5
    max_ongoing_requests: int | None = None
    """Concurrent calls one ingress replica accepts; more wait in the proxy. ``None``: the admission
    bound plus ``max_queued_requests`` (or ``INGRESS_HEADROOM``), so that the ingress refuses calls it cannot
    admit at once."""
    max_queued_requests: int | None = None
    """Calls each proxy holds waiting for an ingress slot; beyond them Serve's proxy refuses a call at
    once (gRPC RESOURCE_EXHAUSTED, but HTTP 503). ``None``: no such bound, so the ingress answers every
    excess call itself (RESOURCE_EXHAUSTED / 429); gRPC bursts are shed by the proxy's gate anyway."""
    max_admitted_requests: int | None = None
    """Requests one ingress replica holds at once, from arrival to their last token; more are refused at
    once with RESOURCE_EXHAUSTED / 429 (load shedding, so a burst cannot queue without bound in front of
    the predictor and the pools). ``None``: what the engine pools can hold (pools x max_replicas x
    ``pools.max_queued_requests``), split over the ingress replicas."""

    def __post_init__(self) -> None:
        check_range("max_output_tokens", self.max_output_tokens, 1)
        if self.max_admitted_requests is not None:
            check_range("max_admitted_requests", self.max_admitted_requests, 1)
        check_range("max_stop_strings", self.max_stop_strings, 0)
        check_range("max_stop_string_chars", self.max_stop_string_chars, 1)
        check_range("max_prompt_chars", self.max_prompt_chars, 1)
        if self.max_prompt_tokens is not None:
            check_range("max_prompt_tokens", self.max_prompt_tokens, 1)
        check_range("max_messages", self.max_messages, 1)
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key: must be a non-blank string, or null for none")
        check_range("num_replicas", self.num_replicas, 1)
        if self.max_replicas_per_node is not None:
            check_range("max_replicas_per_node", self.max_replicas_per_node, 1, 100)
        check_range("num_cpus", self.num_cpus, 0.0)
        if self.max_ongoing_requests is not None:
            check_range("max_ongoing_requests", self.max_ongoing_requests, 1)
        if self.max_queued_requests is not None:
            check_range("max_queued_requests", self.max_queued_requests, 1)


@dataclass(frozen=True)
class SamplingDefaultsConfig:
    """The deployment's serving defaults: what a request that leaves a field unset gets. A field left
    ``null`` here falls back to the model's ``generation_config.json`` (temperature, top_p, top_k,
    repetition_penalty when it samples), else to greedy with no penalty. A request overrides per field."""

    max_tokens: int | None = None
    """``None``: as many as the context and ``ingress.max_output_tokens`` allow."""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def __post_init__(self) -> None:
        check_sampling(vars(self))  # pipeline/sampling.py: the one table of bounds


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    """Export the binserve_* metrics (``cluster/prometheus.py``) through Ray's metrics system."""
    interval_s: float = 1.0
    """How often each engine replica samples its gauges (KV blocks, queues, bubbles)."""

    def __post_init__(self) -> None:
        check_range("interval_s", self.interval_s, 0.05, 3600.0)


@dataclass(frozen=True)
class AppConfig:
    engine: EngineConfig
    router: RouterConfig = field(default_factory=RouterConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    pools: PoolConfig = field(default_factory=PoolConfig)
    ingress: IngressConfig = field(default_factory=IngressConfig)
    sampling: SamplingDefaultsConfig = field(default_factory=SamplingDefaultsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @classmethod
    def from_args(cls, args: Mapping[str, Any] | None) -> AppConfig:
        """Parse a Serve application's ``args`` (see the module docstring)."""
        args = _mapping("args", args)
        sections = (
            "model",
            "cache",
            "scheduler",
            "parallel",
            "router",
            "predictor",
            "pools",
            "ingress",
            "sampling",
            "metrics",
        )
        _reject_unknown("args", args, sections)
        if "model" not in args:
            raise ValueError("args.model: required (a section with at least model_dir)")
        model = _parse(ModelConfig, args.get("model"), "model")
        if model.length_probe == DEFAULT_PROBE:  # the probe shipped for the default model, if it is served
            from cluster.predictor import default_probe_for

            model = dataclasses.replace(model, length_probe=default_probe_for(model.model_dir))
        engine = EngineConfig(
            model=model,
            cache=_parse(CacheConfig, args.get("cache"), "cache"),
            # The served system orders each replica's queue shortest-predicted-job first.
            scheduler=_parse(SchedulerConfig, args.get("scheduler"), "scheduler", {"queue_order": "ssjf"}),
            parallel=_parse(ParallelConfig, args.get("parallel"), "parallel"),
        )
        return cls(
            engine=engine,
            router=_parse(RouterConfig, args.get("router"), "router"),
            predictor=_parse(PredictorConfig, args.get("predictor"), "predictor"),
            pools=_parse(PoolConfig, args.get("pools"), "pools"),
            ingress=_parse(IngressConfig, args.get("ingress"), "ingress"),
            sampling=_parse(SamplingDefaultsConfig, args.get("sampling"), "sampling"),
            metrics=_parse(MetricsConfig, args.get("metrics"), "metrics"),
        )

    @property
    def max_admitted_requests(self) -> int:
        """One ingress replica's admission bound (``ingress.max_admitted_requests``, resolved)."""
        if self.ingress.max_admitted_requests is not None:
            return self.ingress.max_admitted_requests
        capacity = self.router.resolved_num_pools * self.pools.max_replicas * self.pools.max_queued_requests
        return max(1, capacity // self.ingress.num_replicas)

    @property
    def ingress_max_ongoing_requests(self) -> int:
        """One ingress replica's concurrent calls (``ingress.max_ongoing_requests``, resolved)."""
        if self.ingress.max_ongoing_requests is not None:
            return self.ingress.max_ongoing_requests
        # Headroom over the bound: excess calls reach the ingress, which refuses them at once, instead of
        # waiting in the proxy for a slot only to be refused then.
        return self.max_admitted_requests + (self.ingress.max_queued_requests or INGRESS_HEADROOM)

    def __post_init__(self) -> None:
        parallel = self.engine.parallel
        if parallel.uses_stage_actors and self.pools.num_cpus <= 0:
            why = (
                f"parallel.pp_size {parallel.pp_size}"
                if parallel.pp_size > 1
                else "parallel.separate_model_process"
            )
            raise ValueError(
                f"pools.num_cpus: must be > 0 with {why} (it sizes the replica's own placement bundle), got 0"
            )


# ---- parsing ------------------------------------------------------------------------------------------


def _mapping(path: str, data: object) -> Mapping[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: must be a mapping, got {type(data).__name__}")
    return data


def _reject_unknown(path: str, data: Mapping[str, Any], known: typing.Collection[str]) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{path}.{unknown[0]}: unknown field; known fields: {', '.join(sorted(known))}")


def _parse(cls: type, data: object, path: str, defaults: Mapping[str, Any] | None = None) -> Any:
    """Build dataclass ``cls`` from a YAML mapping, checking names and types; its ``__post_init__``
    checks ranges, and its messages (``field: ...``) get the section prefixed."""
    data = _mapping(path, data)
    init_fields = [f for f in fields(cls) if f.init]
    _reject_unknown(path, data, [f.name for f in init_fields])
    hints = typing.get_type_hints(cls)
    for f in init_fields:
        if f.default is MISSING and f.default_factory is MISSING and f.name not in data:
            raise ValueError(f"{path}.{f.name}: required")
    kwargs = {**(defaults or {})}
    kwargs.update({name: _check_type(f"{path}.{name}", value, hints[name]) for name, value in data.items()})
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ValueError(f"{path}.{exc}") from None


def _check_type(path: str, value: object, hint: Any) -> object:
    origin, type_args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in type_args:
            return None
        [hint] = [a for a in type_args if a is not type(None)]
        origin = typing.get_origin(hint)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        hint = str  # the dataclass checks the choice and lists the allowed values
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and isinstance(value, hint):
        return value
    raise ValueError(
        f"{path}: must be {getattr(hint, '__name__', hint)}, got {type(value).__name__} {value!r}"
    )


def parse_section(cls: type, data: object, path: str) -> Any:
    """A YAML section outside ``AppConfig`` (a benchmark's own), parsed and checked like its sections."""
    return _parse(cls, data, path)
