"""The SSJF proxy model: predict a request's output length (in served-model tokens) from its prompt.

``LengthPredictor`` needs torch and is imported on first use, so the router and the command line can
import ``cluster.predictor`` (and its pure-Python ``lengths`` module) without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cluster.predictor.lengths import Prediction

if TYPE_CHECKING:
    from cluster.predictor.predictor import LengthPredictor

__all__ = ["LengthPredictor", "Prediction"]


def __getattr__(name: str) -> object:
    if name == "LengthPredictor":
        from cluster.predictor.predictor import LengthPredictor

        return LengthPredictor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
