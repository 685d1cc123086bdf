"""Train a length predictor on labelled prompts.

    records = read_records("../shared/data/sharegpt_pairs.jsonl.gz", tokenizer_dir="/tmp/tiny-llama")
    predictor = train_predictor(records, TrainConfig(head="buckets"), tokenizer="/tmp/tiny-llama")
    predictor.save("out/predictor")

The frozen part of the encoder runs once over every prompt and its output is cached: the pooled
vector when the whole encoder is frozen (each epoch is then a few seconds of MLP), or the hidden states
entering the fine-tuned layers otherwise (each epoch then runs only those layers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from cluster.predictor.encoder import NUM_ENCODER_LAYERS
from cluster.predictor.lengths import BUCKET_QUANTILES, bin_of, quantile, quantile_boundaries
from cluster.predictor.model import HEADS
from cluster.predictor.predictor import LengthPredictor, PredictorMetadata, build_model
from tools.predictor.records import LengthRecord, split_records

NUM_LENGTH_QUANTILES = 1000
MIN_TRAINING_RECORDS = 8
CACHE_BATCH = 64
# Batches are cut from windows of this many length-sorted examples: little padding, still shuffled.
LENGTH_WINDOW_BATCHES = 20


@dataclass(frozen=True)
class TrainConfig:
    head: str = "regression"
    """"regression" on log tokens, or "buckets" (a classifier over the training quantile buckets)."""
    num_encoder_layers: int = 4
    """MiniLM layers to run (1-6). Layer 4's pooled output predicts length better than layer 6's
    sentence embedding, and skipping two layers cuts inference time by a third."""
    num_finetune_layers: int = 0
    """Top encoder layers trained with the head; 0 keeps the encoder frozen (embeddings cached)."""
    max_prompt_tokens: int = 48
    """Word pieces kept per prompt, head and tail. On ShareGPT 128 scored no better than 64 at 3x the
    cost, and 48 loses 0.016 Spearman against 64 for a third less encoder time (<= 10 ms a request)."""
    num_epochs: int = 10
    batch_size: int = 32
    head_learning_rate: float = 1e-3
    encoder_learning_rate: float = 3e-5
    weight_decay: float = 0.01
    num_hidden: int = 256
    dropout: float = 0.1
    validation_fraction: float = 0.1
    """Share of records held out for evaluation, chosen by a hash of the record id."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head: must be one of {', '.join(HEADS)}, got {self.head!r}")
        if not 1 <= self.num_encoder_layers <= NUM_ENCODER_LAYERS:
            raise ValueError(
                f"num_encoder_layers: must be in [1, {NUM_ENCODER_LAYERS}], got {self.num_encoder_layers}"
            )
        if not 0 <= self.num_finetune_layers <= self.num_encoder_layers:
            raise ValueError(
                f"finetune_layers: must be in [0, {self.num_encoder_layers}] (the encoder layers run), "
                f"got {self.num_finetune_layers}"
            )
        if not 8 <= self.max_prompt_tokens <= 512:
            raise ValueError(f"max_prompt_tokens: must be in [8, 512], got {self.max_prompt_tokens}")
        for name in ("num_epochs", "batch_size", "num_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("head_learning_rate", "encoder_learning_rate"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction: must be in (0, 1), got {self.validation_fraction}")


def make_metadata(train: list[LengthRecord], config: TrainConfig, tokenizer: str) -> PredictorMetadata:
    lengths = sorted(r.output_tokens for r in train)
    return PredictorMetadata(
        head=config.head,
        num_encoder_layers=config.num_encoder_layers,
        num_finetune_layers=config.num_finetune_layers,
        max_prompt_tokens=config.max_prompt_tokens,
        num_hidden=config.num_hidden,
        bucket_quantiles=list(BUCKET_QUANTILES),
        bucket_boundaries=quantile_boundaries(lengths, BUCKET_QUANTILES),
        median_output_tokens=quantile(lengths, 0.5),
        length_quantiles=[
            round(quantile(lengths, i / NUM_LENGTH_QUANTILES), 3) for i in range(NUM_LENGTH_QUANTILES + 1)
        ],
        num_training_records=len(train),
        validation_fraction=config.validation_fraction,
        tokenizer=tokenizer,
        seed=config.seed,
    )


def train_predictor(records: list[LengthRecord], config: TrainConfig, tokenizer: str) -> LengthPredictor:
    """Fit on the training split of ``records``; the held-out split is left for ``evaluate``."""
    train, _ = split_records(records, config.validation_fraction)
    if len(train) < MIN_TRAINING_RECORDS:
        raise ValueError(
            f"data: {len(train)} training records after the split, need at least {MIN_TRAINING_RECORDS}"
        )
    torch.manual_seed(config.seed)
    metadata = make_metadata(train, config, tokenizer)
    model = build_model(metadata, dropout=config.dropout)
    encoder = model.encoder
    tokenized = encoder.tokenize([r.prompt for r in train])
    output_tokens = torch.tensor([r.output_tokens for r in train])
    bucket_ids = torch.tensor([bin_of(r.output_tokens, metadata.bucket_boundaries) for r in train])
    model.set_statistics(tokenized.num_prompt_tokens, output_tokens.tolist(), bucket_ids.tolist())
    is_frozen = config.num_finetune_layers == 0

    # The frozen layers' output, once. no_grad rather than inference_mode: these tensors feed autograd.
    cache: list[torch.Tensor] = [torch.empty(0)] * len(train)
    by_length = sorted(range(len(train)), key=lambda i: len(tokenized.token_ids[i]))
    model.eval()
    with torch.no_grad():
        for start in tqdm(range(0, len(train), CACHE_BATCH), desc="encoding prompts", unit="batch"):
            rows = by_length[start : start + CACHE_BATCH]
            input_ids, attention_mask = encoder.pad([tokenized.token_ids[i] for i in rows])
            hidden = model.frozen_hidden(input_ids, attention_mask)  # (B, T, H)
            pooled = encoder.mean_pool(hidden, attention_mask) if is_frozen else None
            for k, i in enumerate(rows):
                # Half precision halves the memory of cached hidden states; they are inputs, not weights.
                cache[i] = (
                    pooled[k] if pooled is not None else hidden[k, : len(tokenized.token_ids[i])].half()
                )

    trained_layers = list(model.encoder.layers[model.first_trained_layer :].parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": model.head.parameters(), "lr": config.head_learning_rate},
            {"params": trained_layers, "lr": config.encoder_learning_rate},
        ],
        weight_decay=config.weight_decay,
    )
    generator = torch.Generator().manual_seed(config.seed)
    progress = tqdm(range(config.num_epochs), desc="training", unit="epoch")
    for _ in progress:
        model.train()
        total_loss, num_batches = 0.0, 0
        for rows in _batches(len(train), config.batch_size, by_length, is_frozen, generator):
            num_prompt_tokens = [tokenized.num_prompt_tokens[i] for i in rows]
            if is_frozen:
                logits = model.head_logits(torch.stack([cache[i] for i in rows]), num_prompt_tokens)
            else:
                hidden, attention_mask = _pad_hidden([cache[i] for i in rows])
                logits = model.logits_from_hidden(hidden, attention_mask, num_prompt_tokens)
            loss = model.loss(logits, output_tokens[rows], bucket_ids[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += loss.item()
            num_batches += 1
        progress.set_postfix(loss=f"{total_loss / num_batches:.4f}")
    return LengthPredictor(model, metadata)


def _batches(
    num_examples: int, batch_size: int, by_length: list[int], is_frozen: bool, generator: torch.Generator
) -> list[list[int]]:
    """One epoch's batches, shuffled; for fine-tuning, cut from length-sorted windows to save padding."""
    perm = torch.randperm(num_examples, generator=generator).tolist()
    if is_frozen:
        return [perm[i : i + batch_size] for i in range(0, num_examples, batch_size)]
    rank = {example: position for position, example in enumerate(by_length)}
    window = batch_size * LENGTH_WINDOW_BATCHES
    batches = []
    for start in range(0, num_examples, window):
        chunk = sorted(perm[start : start + window], key=rank.__getitem__)
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


def _pad_hidden(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached (T_i, H) half-precision states -> (B, T, H) float32 and the (B, T) attention mask."""
    width = max(s.shape[0] for s in states)
    hidden = torch.zeros(len(states), width, states[0].shape[1])
    attention_mask = torch.zeros(len(states), width, dtype=torch.long)
    for row, state in enumerate(states):
        hidden[row, : state.shape[0]] = state.float()
        attention_mask[row, : state.shape[0]] = 1
    return hidden, attention_mask
