"""How long one engine iteration takes, as a linear function of what the plan computes.

    time_s = base_s + prefill_token_s * prefill_tokens + decode_token_s * decode_tokens
             + kv_token_s * kv_tokens_read + request_s * num_requests

``kv_tokens_read`` is the context every chunk attends to (its end position): decode attention is
memory-bound on it. Fitted by least squares from measured steps (``binserve profile``) or read from a
profile measured elsewhere (a GPU). Pure Python plus numpy.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.plan import StepPlan

FEATURES = ("prefill_tokens", "decode_tokens", "kv_tokens_read", "num_requests")


def plan_features(plan: StepPlan) -> tuple[int, int, int, int]:
    return (
        plan.num_prefill_tokens,
        plan.num_decode_tokens,
        sum(c.end_pos for c in plan.chunks),
        len(plan.chunks),
    )


@dataclass(frozen=True)
class StepCostModel:
    base_s: float
    prefill_token_s: float
    decode_token_s: float
    kv_token_s: float
    request_s: float = 0.0
    source: str = ""
    """Where the coefficients came from (machine, model, command)."""

    def step_time_s(self, plan: StepPlan) -> float:
        prefill, decode, kv, requests = plan_features(plan)
        return (
            self.base_s
            + self.prefill_token_s * prefill
            + self.decode_token_s * decode
            + self.kv_token_s * kv
            + self.request_s * requests
        )

    @classmethod
    def fit(
        cls, features: list[tuple[int, int, int, int]], times_s: list[float], source: str = ""
    ) -> StepCostModel:
        """Least squares with non-negative coefficients (a negative cost per token is not physical):
        refit without any feature whose coefficient came out negative."""
        if len(features) < len(FEATURES) + 1:
            raise ValueError(
                f"steps: need at least {len(FEATURES) + 1} measured steps to fit, got {len(features)}"
            )
        x = np.column_stack([np.ones(len(features)), np.asarray(features, dtype=float)])
        y = np.asarray(times_s, dtype=float)
        active = list(range(x.shape[1]))
        while True:
            coef, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
            negative = [a for a, c in zip(active, coef, strict=True) if c < 0]
            if not negative:
                break
            active = [a for a in active if a not in negative]
        full = np.zeros(x.shape[1])
        full[active] = coef
        return cls(*map(float, full), source=source)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> StepCostModel:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"profile: {str(path)!r} does not exist (write one with `binserve profile`)")
        data = json.loads(path.read_text())
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"profile: {str(path)!r} is not a step-cost profile: {exc}") from exc
