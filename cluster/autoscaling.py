"""Autoscaling an engine pool on predicted outstanding tokens instead of ongoing requests.

Serve's default policy counts ongoing requests, but a request's cost is its output length: ten requests
predicted at 20 tokens are a lighter load than two at 2,000. Each engine replica reports the predicted
output tokens it still has to generate (``EnginePool.record_autoscaling_stats``), and this policy asks for

    desired replicas = sum over replicas of outstanding predicted tokens / target tokens per replica

Serve applies the deployment's ``min_replicas``/``max_replicas``, scaling factors and up/down delays
around it. Wired per pool by ``cluster.app`` as

    autoscaling_config={"policy": {"policy_function": "cluster.autoscaling:PredictedTokensPolicy",
                                   "policy_kwargs": {"target_outstanding_tokens": 8192}}, ...}

Pure Python: the context is duck-typed (Serve's ``AutoscalingContext``), so tests drive it with plain data.
"""

from __future__ import annotations

from typing import Any, Protocol

OUTSTANDING_TOKENS_METRIC = "outstanding_predicted_tokens"
"""The metric each engine replica reports from ``EnginePool.record_autoscaling_stats``."""


class AutoscalingContextLike(Protocol):
    """The part of ``ray.serve.config.AutoscalingContext`` this policy reads."""

    current_num_replicas: int
    target_num_replicas: int
    policy_state: dict[str, Any]

    @property
    def total_num_requests(self) -> float:
        """Requests running in replicas plus those queued in the callers' handles."""

    @property
    def aggregated_metrics(self) -> dict[str, dict[Any, float]] | None: ...


class PredictedTokensPolicy:
    """A class policy: Serve builds it once with ``policy_kwargs`` and calls it every control-loop tick."""

    def __init__(self, target_outstanding_tokens: int = 8192) -> None:
        if not isinstance(target_outstanding_tokens, int) or target_outstanding_tokens < 1:
            raise ValueError(
                f"target_outstanding_tokens: must be an integer >= 1, got {target_outstanding_tokens!r}"
            )
        self.target_outstanding_tokens = target_outstanding_tokens

    def __call__(self, ctx: AutoscalingContextLike) -> tuple[float, dict[str, Any]]:
        per_replica = (ctx.aggregated_metrics or {}).get(OUTSTANDING_TOKENS_METRIC) or {}
        if ctx.current_num_replicas == 0 and ctx.total_num_requests > 0:
            # Scaled to zero with callers waiting in their handles: no replica can report predicted
            # tokens, so start one; its reports take over from there.
            return max(1.0, float(ctx.target_num_replicas)), {}
        if ctx.current_num_replicas == 0 or not per_replica:
            # Starting, or no report yet: keep the current target rather than scale on missing data.
            return float(ctx.target_num_replicas), {}
        outstanding_tokens = sum(per_replica.values())
        # Reports of replicas that just stopped may linger; the sum over those still reporting is the load.
        desired = outstanding_tokens / self.target_outstanding_tokens
        if ctx.total_num_requests > 0:
            # Requests still running keep one replica: a request past its predicted length adds no
            # predicted tokens, and scaling to zero under it would cut its stream.
            desired = max(desired, 1.0)
        return desired, {"outstanding_tokens": outstanding_tokens}
