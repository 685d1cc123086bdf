"""binserve's Prometheus metrics, through Ray Serve's metrics (``ray.serve.metrics``).

Each series is named ``binserve_*`` here; Ray exports it as ``ray_binserve_*`` on every node's metrics
endpoint (``ray start --metrics-export-port``, or ``binserve serve --metrics-export-port`` locally),
tagged with the Serve application, deployment and replica. ``METRICS`` is the catalogue: name, kind and
help of every series; the Grafana dashboard (``deploy/grafana/binserve.json``) refers only to these.

    metrics = EngineMetrics(pool_id=0)          # inside an engine replica
    engine.add_step_observer(metrics.observe_step)
    metrics.observe_finished(request_metrics, finish_reason)
    metrics.report(snapshot)                    # gauges, every second from a reporter thread
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.engine import RequestMetrics
from pipeline.plan import StepPlan
from pipeline.request import FinishReason


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # "counter", "gauge" or "histogram"
    help: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()


_LATENCY_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

METRICS: tuple[MetricSpec, ...] = (
    # ---- the ingress: what callers saw -------------------------------------------------------------
    MetricSpec(
        "binserve_requests_total",
        "counter",
        "Requests by API, outcome (gRPC status) and bin.",
        ("api", "code", "bin"),
    ),
    MetricSpec(
        "binserve_predictor_latency_seconds",
        "histogram",
        "Ingress wait for the length prediction.",
        (),
        _LATENCY_S,
    ),
    MetricSpec(
        "binserve_predictor_batch_size", "histogram", "Prompts per predictor call (batched).", (), _TOKENS
    ),
    # ---- the engine replicas: per request ------------------------------------------------------------
    MetricSpec(
        "binserve_engine_requests_total",
        "counter",
        "Requests an engine finished, by reason and bin.",
        ("finish_reason", "bin"),
    ),
    MetricSpec(
        "binserve_ttft_seconds",
        "histogram",
        "Arrival at the engine to the first output token.",
        ("bin",),
        _LATENCY_S,
    ),
    MetricSpec(
        "binserve_tbt_seconds", "histogram", "Time between consecutive output tokens.", ("bin",), _LATENCY_S
    ),
    MetricSpec(
        "binserve_e2e_latency_seconds",
        "histogram",
        "Arrival at the engine to the last token.",
        ("bin",),
        _LATENCY_S,
    ),
    MetricSpec(
        "binserve_queue_wait_seconds",
        "histogram",
        "Arrival at the engine to its first KV blocks.",
        ("bin",),
        _LATENCY_S,
    ),
    MetricSpec(
        "binserve_prediction_error_tokens",
        "histogram",
        "|predicted - actual| output tokens of finished requests; direction says over or under "
        "(Prometheus histograms take positive values: mean signed error = (sum over - sum under) / count).",
        ("bin", "direction"),
        _TOKENS,
    ),
    MetricSpec("binserve_output_tokens_total", "counter", "Output tokens generated.", ("bin",)),
    # ---- the engine replicas: per step and state ------------------------------------------------------
    MetricSpec(
        "binserve_step_tokens", "histogram", "Tokens computed per engine step (micro-batch).", (), _TOKENS
    ),
    MetricSpec(
        "binserve_step_seconds", "histogram", "Seconds per engine step (micro-batch).", (), _LATENCY_S
    ),
    MetricSpec(
        "binserve_preemptions",
        "gauge",
        "Requests preempted (KV freed, recomputed later) since the replica started; a gauge so that it is "
        "exported before the first preemption (Ray counters appear only once incremented).",
    ),
    MetricSpec("binserve_kv_blocks_used", "gauge", "KV cache blocks held by requests."),
    MetricSpec(
        "binserve_kv_blocks_cached",
        "gauge",
        "KV blocks named for prefix caching (in use or free): what a new request could hit.",
    ),
    MetricSpec(
        "binserve_kv_blocks_evicted",
        "gauge",
        "Cached KV blocks evicted (name dropped to reuse the block) since the replica started.",
    ),
    MetricSpec(
        "binserve_prefix_queried_tokens",
        "gauge",
        "Prompt tokens of admitted requests looked up in the prefix cache since the replica started.",
    ),
    MetricSpec(
        "binserve_prefix_hit_tokens",
        "gauge",
        "Of the queried prompt tokens, those found cached (hit rate = hit / queried).",
    ),
    MetricSpec("binserve_kv_blocks_free", "gauge", "KV cache blocks free."),
    MetricSpec("binserve_running_requests", "gauge", "Requests holding KV blocks."),
    MetricSpec("binserve_waiting_requests", "gauge", "Requests waiting for KV blocks (the SSJF queue)."),
    MetricSpec(
        "binserve_outstanding_predicted_tokens",
        "gauge",
        "Predicted output tokens still to generate: the autoscaling signal.",
    ),
    MetricSpec(
        "binserve_pipeline_bubble_fraction",
        "gauge",
        "Share of stage time idle while the replica's pipeline had work (since the last report).",
    ),
    MetricSpec("binserve_stage_utilisation", "gauge", "Busy share of each pipeline stage.", ("stage",)),
)
METRIC_NAMES = frozenset(spec.name for spec in METRICS)
EXPORTED_PREFIX = "ray_"
"""Ray prefixes every application metric with this on its Prometheus endpoint."""


def _make(spec: MetricSpec):
    from ray.serve import metrics

    if spec.kind == "counter":
        return metrics.Counter(spec.name, description=spec.help, tag_keys=spec.tag_keys)
    if spec.kind == "gauge":
        return metrics.Gauge(spec.name, description=spec.help, tag_keys=spec.tag_keys)
    return metrics.Histogram(
        spec.name, description=spec.help, boundaries=list(spec.boundaries), tag_keys=spec.tag_keys
    )


class _Series:
    """The catalogue's series, created on first use in the process that records them."""

    def __init__(self, names: tuple[str, ...]) -> None:
        specs = {spec.name: spec for spec in METRICS}
        self._series = {name: _make(specs[name]) for name in names}

    def __getitem__(self, name: str):
        return self._series[name]


@dataclass(frozen=True)
class EngineSnapshot:
    """A replica's state, sampled by its reporter thread."""

    num_kv_blocks: int
    num_free_kv_blocks: int
    num_running: int
    num_waiting: int
    num_preemptions: int
    outstanding_predicted_tokens: int
    bubble_fraction: float | None = None
    stage_utilisation: tuple[float, ...] = ()
    num_cached_kv_blocks: int = 0
    num_evicted_kv_blocks: int = 0
    num_prefix_queried_tokens: int = 0
    num_prefix_hit_tokens: int = 0


class EngineMetrics:
    _NAMES = tuple(
        s.name for s in METRICS if not s.name.startswith(("binserve_requests", "binserve_predictor"))
    )

    def __init__(self) -> None:
        self.series = _Series(self._NAMES)

    def observe_step(self, plan: StepPlan, step_s: float) -> None:
        self.series["binserve_step_tokens"].observe(plan.num_tokens)
        self.series["binserve_step_seconds"].observe(step_s)

    def observe_finished(self, metrics: RequestMetrics, finish_reason: FinishReason) -> None:
        tags = {"bin": str(metrics.bin_id)}
        self.series["binserve_engine_requests_total"].inc(tags={"finish_reason": finish_reason.value, **tags})
        self.series["binserve_output_tokens_total"].inc(metrics.num_output_tokens, tags=tags)
        self.series["binserve_e2e_latency_seconds"].observe(metrics.completion_s, tags=tags)
        if metrics.ttft_s is not None:
            self.series["binserve_ttft_seconds"].observe(metrics.ttft_s, tags=tags)
        if metrics.queueing_s is not None:
            self.series["binserve_queue_wait_seconds"].observe(metrics.queueing_s, tags=tags)
        for tbt_s in metrics.tbt_s:
            self.series["binserve_tbt_seconds"].observe(tbt_s, tags=tags)
        if metrics.predicted_output_tokens is not None and finish_reason is not FinishReason.ABORT:
            error = metrics.predicted_output_tokens - metrics.num_output_tokens
            direction = "over" if error >= 0 else "under"
            self.series["binserve_prediction_error_tokens"].observe(
                abs(error), tags={**tags, "direction": direction}
            )

    def report(self, snapshot: EngineSnapshot) -> None:
        s = self.series
        s["binserve_kv_blocks_used"].set(snapshot.num_kv_blocks - snapshot.num_free_kv_blocks)
        s["binserve_kv_blocks_free"].set(snapshot.num_free_kv_blocks)
        s["binserve_running_requests"].set(snapshot.num_running)
        s["binserve_waiting_requests"].set(snapshot.num_waiting)
        s["binserve_outstanding_predicted_tokens"].set(snapshot.outstanding_predicted_tokens)
        s["binserve_preemptions"].set(snapshot.num_preemptions)
        s["binserve_kv_blocks_cached"].set(snapshot.num_cached_kv_blocks)
        s["binserve_kv_blocks_evicted"].set(snapshot.num_evicted_kv_blocks)
        s["binserve_prefix_queried_tokens"].set(snapshot.num_prefix_queried_tokens)
        s["binserve_prefix_hit_tokens"].set(snapshot.num_prefix_hit_tokens)
        if snapshot.bubble_fraction is not None:
            s["binserve_pipeline_bubble_fraction"].set(snapshot.bubble_fraction)
        for stage, utilisation in enumerate(snapshot.stage_utilisation):
            s["binserve_stage_utilisation"].set(utilisation, tags={"stage": str(stage)})


class IngressMetrics:
    _NAMES = ("binserve_requests_total", "binserve_predictor_latency_seconds")

    def __init__(self, enabled: bool = True) -> None:
        """``enabled=False``: every observation is a no-op (``metrics.enabled: false`` in the config)."""
        self.series = _Series(self._NAMES) if enabled else None

    def observe_request(self, api: str, code: str, bin_id: int | None) -> None:
        """One answered call: ``code`` is the gRPC status name (OK, INVALID_ARGUMENT, ...)."""
        if self.series is None:
            return
        tags = {"api": api, "code": code, "bin": "none" if bin_id is None else str(bin_id)}
        self.series["binserve_requests_total"].inc(tags=tags)

    def observe_prediction(self, seconds: float) -> None:
        if self.series is None:
            return
        self.series["binserve_predictor_latency_seconds"].observe(seconds)


class PredictorMetrics:
    _NAMES = ("binserve_predictor_batch_size",)

    def __init__(self) -> None:
        self.series = _Series(self._NAMES)

    def observe_batch(self, num_prompts: int) -> None:
        self.series["binserve_predictor_batch_size"].observe(num_prompts)
