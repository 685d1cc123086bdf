"""The SSJF proxy model: predict a request's output length (in served-model tokens) from its prompt.

``LengthPredictor`` needs torch and is imported on first use, so the router and the command line can
import ``cluster.predictor`` (and its pure-Python ``lengths`` module) without loading torch.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.predictor.lengths import Prediction
from cluster.predictor.served_model import ServedModel, warn_if_mismatched
from pipeline.config import check_choice

DEFAULT_DIR = Path(__file__).parent / "default"
DEFAULT_PROBE_DIR = DEFAULT_DIR / "probe"
"""The length probe for the default model (``workers/length_probe.py``; ``model.length_probe: default``)."""
"""SmolLM2-135M-Instruct's own output lengths under the deployment's default sampling."""
FAST_DIR = Path(__file__).parent / "fast"
"""SmolLM2's own lengths again, from MiniLM's word-piece embeddings without its layers: about a tenth of the
default's time a prompt, ranking fresh prompts a little worse (docs/PREDICTOR.md)."""
CHATGPT_DIR = Path(__file__).parent / "chatgpt"
"""ChatGPT's answer lengths (the ShareGPT responses) in the tiny model's tokens: forced-length experiments."""
SHIPPED = {"default": DEFAULT_DIR, "fast": FAST_DIR}
"""Predictors named in a deployment's ``predictor.path`` instead of a directory."""


def predictor_dir(path: str | Path | None) -> Path:
    """The directory of ``predictor.path``: None or ``default`` the default, ``fast`` the fast one shipped
    beside it, else the path itself."""
    if path is None:
        return DEFAULT_DIR
    return SHIPPED.get(str(path), Path(path))


ENCODER_PRECISIONS = ("float32", "int8")
"""How the encoder's Linear layers run: as trained, or as int8 weights (``LengthPredictor.load``)."""
MIN_PROMPT_TOKENS = 8
MAX_PROMPT_TOKENS = 512
"""MiniLM's position embeddings end at 512; below 8, [CLS] and [SEP] leave the prompt almost nothing."""

if TYPE_CHECKING:
    from cluster.predictor.predictor import LengthPredictor


def default_probe_for(model_dir: str) -> str | None:
    """The shipped length probe's directory when ``model_dir`` is the model it was trained on (same
    ``config.json`` fingerprint); else None, with a warning: a probe reads one model's hidden states."""
    meta_path = DEFAULT_PROBE_DIR / "probe.json"
    if not meta_path.is_file() or not (Path(model_dir) / "config.json").is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("model_config_sha256") != ServedModel.of(model_dir).config_sha256:
        warnings.warn(
            f"length probe: the shipped probe reads {meta['model']}'s hidden "
            f"states, not {Path(model_dir).name}'s; serving without one (train one: "
            "`binserve predictor train-probe`)",
            stacklevel=2,
        )
        return None
    return str(DEFAULT_PROBE_DIR)


__all__ = [
    "CHATGPT_DIR",
    "DEFAULT_DIR",
    "DEFAULT_PROBE_DIR",
    "FAST_DIR",
    "LengthPredictor",
    "Prediction",
    "check_predictor_for_model",
    "predictor_dir",
]


def check_predictor_for_model(predictor_directory: str | Path | None, model_dir: str | Path) -> str | None:
    """Warn when the predictor in ``predictor_directory`` (``predictor_dir``'s names allowed) learned another model's lengths
    than ``model_dir``'s; returns the warning or None. Reads only ``predictor.json`` (no torch), so the
    command line can call it before deploying (``binserve serve``)."""
    import json

    metadata_path = predictor_dir(predictor_directory) / "predictor.json"
    if not metadata_path.is_file():
        raise ValueError(f"predictor: no predictor.json in {metadata_path.parent}")
    trained_for = json.loads(metadata_path.read_text()).get("served_model")
    return warn_if_mismatched(ServedModel(**trained_for) if trained_for else None, model_dir)


def check_encoder_options(encoder_precision: str, max_prompt_tokens: int | None) -> None:
    """How a predictor may run, checked in one place (torch-free) for ``LengthPredictor.load`` and
    ``PredictorConfig``."""
    check_choice("encoder_precision", encoder_precision, ENCODER_PRECISIONS)
    if max_prompt_tokens is not None and not (
        isinstance(max_prompt_tokens, int) and MIN_PROMPT_TOKENS <= max_prompt_tokens <= MAX_PROMPT_TOKENS
    ):
        raise ValueError(
            f"max_prompt_tokens: must be null (the predictor's trained value) or an integer in "
            f"[{MIN_PROMPT_TOKENS}, {MAX_PROMPT_TOKENS}], got {max_prompt_tokens!r}"
        )


def __getattr__(name: str) -> object:
    if name == "LengthPredictor":
        from cluster.predictor.predictor import LengthPredictor

        return LengthPredictor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
