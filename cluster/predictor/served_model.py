"""Which model a predictor (or a file of labels) was made for, and whether that is the model being served.

    trained_for = ServedModel.of(".models/smollm2-135m-instruct")
    problem = trained_for.mismatch(ServedModel.of(serving_model_dir))   # None when they agree
    warn_if_mismatched(predictor.metadata.served_model, serving_model_dir)  # the serving path's check

Output lengths are a property of a model *and* its tokenizer: the same answer is 300 tokens under one
tokenizer and 420 under another, and two models with one tokenizer still answer at different lengths.
So a model is identified by fingerprints of its ``config.json`` (the architecture and the size) and of
its ``tokenizer.json``, not by its directory, which moves between machines.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# Written by converters and transformers versions, not properties of the model.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "dtype", "torch_dtype", "_name_or_path", "use_cache")


def _fingerprint(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True)
class ServedModel:
    name: str
    """The checkpoint directory's name (informational: directories move)."""
    config_sha256: str
    """First 16 hex digits of the SHA-256 of ``config.json``, keys sorted, volatile keys dropped."""
    tokenizer_sha256: str
    """First 16 hex digits of the SHA-256 of ``tokenizer.json``: the tokenizer the lengths are counted in."""

    @classmethod
    def of(cls, model_dir: str | Path) -> ServedModel:
        path = Path(model_dir)
        config_path, tokenizer_path = path / "config.json", path / "tokenizer.json"
        for required in (config_path, tokenizer_path):
            if not required.is_file():
                raise ValueError(f"model: {path} has no {required.name} (not a served model's directory)")
        config = json.loads(config_path.read_text())
        for key in _VOLATILE_CONFIG_KEYS:
            config.pop(key, None)
        return cls(
            name=path.resolve().name,
            config_sha256=_fingerprint(json.dumps(config, sort_keys=True).encode()),
            tokenizer_sha256=_fingerprint(tokenizer_path.read_bytes()),
        )

    def mismatch(self, other: ServedModel) -> str | None:
        """Why lengths made for ``self`` do not hold for ``other``; None when they do."""
        if self.tokenizer_sha256 != other.tokenizer_sha256:
            return (
                f"made for {self.name} (tokenizer {self.tokenizer_sha256}), but {other.name} counts tokens "
                f"with another tokenizer ({other.tokenizer_sha256})"
            )
        if self.config_sha256 != other.config_sha256:
            return (
                f"made for {self.name} (config {self.config_sha256}), but {other.name} is a different model "
                f"(config {other.config_sha256}) that shares its tokenizer"
            )
        return None


def warn_if_mismatched(trained_for: ServedModel | None, model_dir: str | Path) -> str | None:
    """Warn (``warnings`` and the log) when a predictor trained for ``trained_for`` is about to serve the
    model in ``model_dir``; returns the message, or None when they agree. A predictor saved before
    predictors recorded their model (``trained_for`` None) is reported as unknown."""
    if trained_for is None:
        message = f"length predictor: it does not record which model it was trained for; serving {model_dir}"
    else:
        problem = trained_for.mismatch(ServedModel.of(model_dir))
        if problem is None:
            return None
        message = f"length predictor: {problem}; its predicted lengths will be off (retrain it: README)"
    warnings.warn(message, stacklevel=2)
    logger.warning(message)
    return message
