"""The sampling fields, defined once: name, engine default and allowed range.

Every door takes its checks and defaults from this table: ``SamplingParams`` (the engine's type), the Serve
config's ``sampling`` section, the ingress's checks for gRPC and HTTP, the CLI's flags and the Python API. A
bound therefore cannot differ between two of them. Ranges are OpenAI's where OpenAI has the field
(temperature in [0, 2], penalties in [-2, 2]); ``repetition_penalty`` is transformers' and vLLM's, (0, 2].

What a request that leaves a field unset gets is decided in one order everywhere (as transformers and vLLM
do): the deployment's ``sampling`` section (served only), then the model's ``generation_config.json``
(``model_sampling_defaults``), then the engine default here (greedy, no penalty).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingField:
    name: str
    default: float | int | None
    """The engine's own default: greedy with no penalty (``None``: unset, e.g. no seed)."""
    low: float | None = None
    high: float | None = None
    low_is_open: bool = False
    """The low bound itself is not allowed (``top_p`` must be above 0)."""

    @property
    def allowed(self) -> str:
        low = "-inf" if self.low is None else self.low
        high = "inf" if self.high is None else self.high
        return f"{'(' if self.low_is_open else '['}{low}, {high}]"

    def check(self, value: float | int) -> None:
        """``ValueError`` naming the field and its range unless ``value`` is a finite number within it."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{self.name}: must be a number, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{self.name}: must be a finite number, got {value}")
        too_low = self.low is not None and (value <= self.low if self.low_is_open else value < self.low)
        too_high = self.high is not None and value > self.high
        if too_low or too_high:
            raise ValueError(f"{self.name}: must be in {self.allowed}, got {value!r}")


SAMPLING_FIELDS: tuple[SamplingField, ...] = (
    SamplingField("max_tokens", 16, low=1),
    SamplingField("temperature", 0.0, low=0.0, high=2.0),
    SamplingField("top_p", 1.0, low=0, high=1, low_is_open=True),
    SamplingField("top_k", 0, low=0),
    SamplingField("seed", None, low=0, high=2**63 - 1),
    SamplingField("repetition_penalty", 1.0, low=0, high=2, low_is_open=True),
    SamplingField("presence_penalty", 0.0, low=-2.0, high=2.0),
    SamplingField("frequency_penalty", 0.0, low=-2.0, high=2.0),
)
FIELDS: dict[str, SamplingField] = {f.name: f for f in SAMPLING_FIELDS}
FIELD_NAMES: tuple[str, ...] = tuple(FIELDS)

MODEL_SAMPLING_FIELDS: tuple[str, ...] = ("temperature", "top_p", "top_k")
"""What a model's ``generation_config.json`` sets when it samples (``do_sample``)."""


def check_sampling(values: Mapping[str, object]) -> None:
    """Check every field given (``None`` is unset and passes)."""
    for name, value in values.items():
        if value is not None:
            FIELDS[name].check(value)  # type: ignore[arg-type]


def model_sampling_defaults(generation_config: Mapping[str, object]) -> dict[str, float | int]:
    """The defaults a model's ``generation_config.json`` states: its sampling fields only when it samples
    (``do_sample``), its ``repetition_penalty`` either way, as transformers' ``generate`` applies them. What
    the file does not state is not taken (transformers' implicit ``top_k=50`` was not the authors' choice)."""
    names = (*MODEL_SAMPLING_FIELDS, "repetition_penalty") if generation_config.get("do_sample") else (
        "repetition_penalty",
    )
    found = {k: generation_config[k] for k in names if generation_config.get(k) is not None}
    check_sampling(found)
    return found  # type: ignore[return-value]
