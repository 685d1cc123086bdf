"""Refine each decoding request's output length from the served model's own hidden state (TRAIL-style).

    probe = LengthProbe.load("cluster/predictor/default/probe")       # trained by `binserve predictor train-probe`
    runner = ModelRunner(model, cache, length_probe=probe)             # the last stage calls it each step
    refined = probe(plan.sampling_chunks, hidden_rows)                 # whole-output guesses, or None

The last stage already computes each sampled row's final-normed hidden state (what the LM head reads).
Every ``interval`` output tokens from ``start`` on, a linear map of that vector (standardised) and of
``log1p(tokens so far)`` predicts ``log1p(tokens still to come)``; the runner returns ``tokens so far +
that`` as the request's refined whole output, capped at its ``max_tokens``, in
``StepOutput.refined_output_tokens``, and the scheduler orders, evicts and admits by it. It costs one
dot product of the hidden size per refined row.

``FeatureRecorder`` has the same call signature: ``binserve predictor collect --features`` uses it to
save each request's hidden state at fixed output positions, the probe's training data.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.plan import ScheduledChunk

WEIGHTS_FILE = "probe.safetensors"
META_FILE = "probe.json"


@dataclass(frozen=True)
class ProbeMetadata:
    hidden_size: int
    """The served model's hidden size; a probe for another size is refused at load."""
    model: str
    """The model directory's name it was trained on (informational)."""
    model_config_sha256: str = ""
    """Fingerprint of that model's ``config.json`` (``cluster.predictor.served_model.ServedModel``)."""
    start: int = 16
    """The first output position refined (fewer tokens say little)."""
    interval: int = 16
    """Refine every this many output tokens."""
    trained_on: str = ""
    """Where its labels came from, and how many."""


class LengthProbe:
    def __init__(
        self,
        weight: torch.Tensor,
        bias: float,
        mean: torch.Tensor,
        scale: torch.Tensor,
        metadata: ProbeMetadata,
    ) -> None:
        """``weight`` (hidden_size + 1,): standardised hidden state, then log1p(tokens so far)."""
        if weight.shape != (metadata.hidden_size + 1,):
            raise ValueError(
                f"probe: weight has shape {tuple(weight.shape)}, expected ({metadata.hidden_size + 1},)"
            )
        self.weight, self.bias, self.mean, self.scale = (
            weight.float(),
            float(bias),
            mean.float(),
            scale.float(),
        )
        self.metadata = metadata

    def is_due(self, chunk: ScheduledChunk) -> bool:
        """Whether ``chunk``'s row is refined this step."""
        at = chunk.output_index
        return at >= self.metadata.start and (at - self.metadata.start) % self.metadata.interval == 0

    def predict_remaining(self, hidden: torch.Tensor, num_output_tokens: torch.Tensor) -> torch.Tensor:
        """hidden (N, H), tokens so far (N,) -> predicted tokens still to come (N,), float."""
        if self.weight.device != hidden.device:  # once: the runner's device (a no-op on CPU)
            self.weight, self.mean, self.scale = (
                t.to(hidden.device) for t in (self.weight, self.mean, self.scale)
            )
        x = (hidden.float() - self.mean) / self.scale
        log_at = torch.log1p(num_output_tokens.float().to(hidden.device))
        y = x @ self.weight[:-1] + log_at * self.weight[-1] + self.bias
        return torch.expm1(y).clamp(min=0.0)

    def __call__(self, chunks: Sequence[ScheduledChunk], hidden: torch.Tensor) -> tuple[int | None, ...]:
        """One refined whole-output length per sampled row (None where not due this step)."""
        rows = [i for i, chunk in enumerate(chunks) if self.is_due(chunk)]
        refined: list[int | None] = [None] * len(chunks)
        if not rows:
            return tuple(refined)
        at = torch.tensor([chunks[i].output_index for i in rows])
        remaining = self.predict_remaining(hidden[torch.tensor(rows, device=hidden.device)], at).tolist()
        for i, left in zip(rows, remaining, strict=True):
            chunk = chunks[i]
            assert chunk.sampling is not None
            total = chunk.output_index + max(1, math.ceil(left))
            refined[i] = min(total, chunk.sampling.max_tokens)
        return tuple(refined)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {
                "weight": self.weight,
                "bias": torch.tensor([self.bias]),
                "mean": self.mean,
                "scale": self.scale,
            },
            str(directory / WEIGHTS_FILE),
        )
        (directory / META_FILE).write_text(json.dumps(asdict(self.metadata), indent=1) + "\n")

    @classmethod
    def load(cls, directory: str | Path, hidden_size: int | None = None) -> LengthProbe:
        """``hidden_size``: the served model's, checked against the probe's."""
        directory = Path(directory)
        for required in (directory / WEIGHTS_FILE, directory / META_FILE):
            if not required.is_file():
                raise ValueError(
                    f"length_probe: {directory} has no {required.name} (train one with "
                    "`binserve predictor train-probe`)"
                )
        metadata = ProbeMetadata(**json.loads((directory / META_FILE).read_text()))
        if hidden_size is not None and hidden_size != metadata.hidden_size:
            raise ValueError(
                f"length_probe: {directory} reads hidden states of size {metadata.hidden_size} (model "
                f"{metadata.model}), the served model's are {hidden_size}"
            )
        tensors = load_file(str(directory / WEIGHTS_FILE))
        return cls(tensors["weight"], float(tensors["bias"][0]), tensors["mean"], tensors["scale"], metadata)


RECORD_POSITIONS = (0, 16, 32, 64, 128, 256)
"""Output positions at which ``FeatureRecorder`` keeps a request's hidden state."""


class FeatureRecorder:
    """A stand-in probe that refines nothing and keeps the hidden state of each request at
    ``positions`` (its tokens so far), keyed by request id, for training a probe."""

    def __init__(self, positions: Sequence[int] = RECORD_POSITIONS) -> None:
        self.positions = frozenset(positions)
        self.features: dict[str, dict[int, torch.Tensor]] = {}

    def __call__(self, chunks: Sequence[ScheduledChunk], hidden: torch.Tensor) -> tuple[int | None, ...]:
        for row, chunk in enumerate(chunks):
            if chunk.output_index in self.positions:
                self.features.setdefault(chunk.request_id, {})[chunk.output_index] = (
                    hidden[row].detach().to("cpu", torch.float16).clone()
                )
        return (None,) * len(chunks)

    def pop(self, request_id: str) -> dict[int, torch.Tensor]:
        """A finished request's recorded states, by output position (dropped here)."""
        return self.features.pop(request_id, {})
