"""Train a length predictor on labelled prompts.

    records = read_records("cluster/predictor/data/smollm2-135m-instruct.seed0.jsonl", MODEL_DIR)
    chatgpt = read_records(...)  # ShareGPT pairs: ChatGPT's answer lengths, an auxiliary target
    predictor = train_predictor(records, TrainConfig(rank_loss_weight=1.0), MODEL_DIR, aux_records=chatgpt)
    predictor.save("out/predictor")

The frozen part of the encoder runs once over every prompt and its output is cached: the pooled
vector when the whole encoder is frozen (each epoch is then a few seconds of MLP), or the hidden states
entering the fine-tuned layers otherwise (each epoch then runs only those layers).

Records in the held-out split (a hash of the id, ``records.is_validation``) are dropped from both the
labels and the auxiliary records, so a held-out prompt is never seen in training under any label.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bench.labels import LengthRecord, split_records
from cluster.predictor.encoder import NUM_ENCODER_LAYERS
from cluster.predictor.lengths import BUCKET_QUANTILES, bin_of, quantile, quantile_boundaries
from cluster.predictor.model import HEADS, MISSING
from cluster.predictor.predictor import ENCODERS, LengthPredictor, PredictorMetadata, build_model
from cluster.predictor.served_model import ServedModel

NUM_LENGTH_QUANTILES = 1000
MIN_TRAINING_RECORDS = 8
CACHE_BATCH = 64


@dataclass(frozen=True)
class TrainConfig:
    head: str = "regression"
    """"regression" on log tokens, or "buckets" (a classifier over the training quantile buckets)."""
    encoder: str = "minilm"
    """``minilm`` or ``served-model`` (the served checkpoint's embeddings and first layers, frozen)."""
    num_encoder_layers: int = 4
    """Encoder layers to run (MiniLM: 1-6). MiniLM's layer 4 predicts length better than layer 6's
    sentence embedding, and skipping two layers cuts inference time by a third."""
    rank_loss_weight: float = 0.0
    """Weight of the pairwise ranking loss beside the Huber loss on log length (regression head)."""
    aux_loss_weight: float = 0.5
    """Weight of the auxiliary ChatGPT-length loss, when auxiliary records are given."""
    max_output_tokens: int | None = None
    """The ``max_tokens`` the labels were generated under; predictions are capped there."""
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
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder: must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")
        if self.encoder == "served-model":
            if not 0 <= self.num_encoder_layers <= 30:
                raise ValueError(f"num_encoder_layers: must be in [0, 30], got {self.num_encoder_layers}")
            if self.num_finetune_layers:
                raise ValueError("finetune_layers: the served model's layers stay frozen (they serve too)")
        elif not int(self.head != "linear") <= self.num_encoder_layers <= NUM_ENCODER_LAYERS:
            # The linear head may pool MiniLM's word-piece embeddings alone (no layer run).
            low = int(self.head != "linear")
            raise ValueError(
                f"num_encoder_layers: must be in [{low}, {NUM_ENCODER_LAYERS}], got {self.num_encoder_layers}"
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
        if self.rank_loss_weight < 0 or self.aux_loss_weight < 0:
            raise ValueError("rank_loss_weight, aux_loss_weight: must be >= 0")
        if self.head != "regression" and self.rank_loss_weight:
            raise ValueError("rank_loss_weight: only with the regression head")
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise ValueError(f"max_output_tokens: must be at least 1, got {self.max_output_tokens}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction: must be in (0, 1), got {self.validation_fraction}")


def make_metadata(
    train: list[LengthRecord],
    config: TrainConfig,
    tokenizer: str,
    num_aux_outputs: int = 0,
    label_source: str = "",
) -> PredictorMetadata:
    lengths = sorted(r.output_tokens for r in train)
    served = ServedModel.of(tokenizer) if Path(tokenizer).is_dir() else None
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
        tokenizer=served.name if served else tokenizer,
        seed=config.seed,
        encoder=config.encoder,
        served_model=served,
        label_source=label_source,
        max_output_tokens=config.max_output_tokens,
        num_aux_outputs=num_aux_outputs,
        rank_loss_weight=config.rank_loss_weight,
        aux_loss_weight=config.aux_loss_weight if num_aux_outputs else 0.0,
    )


def train_predictor(
    records: list[LengthRecord],
    config: TrainConfig,
    tokenizer: str,
    aux_records: list[LengthRecord] | None = None,
    label_source: str = "",
    feature_cache_dir: str | Path | None = None,
) -> LengthPredictor:
    """Fit on the training split of ``records`` (and of ``aux_records``, ChatGPT's lengths, joined by id);
    the held-out split is left for ``evaluate``. ``tokenizer`` is the served model's directory. With a
    frozen encoder and ``feature_cache_dir``, pooled prompt vectors are kept there between runs (encoding
    10,000 prompts is most of a run's time; comparing heads and losses need not repeat it)."""
    train, _ = split_records(records, config.validation_fraction)
    if len(train) < MIN_TRAINING_RECORDS:
        raise ValueError(
            f"data: {len(train)} training records after the split, need at least {MIN_TRAINING_RECORDS}"
        )
    aux_train, _ = split_records(aux_records or [], config.validation_fraction)
    torch.manual_seed(config.seed)
    metadata = make_metadata(train, config, tokenizer, 1 if aux_train else 0, label_source)
    model = build_model(metadata, dropout=config.dropout, model_dir=tokenizer)
    # One example per prompt: the served label where there is one, ChatGPT's length where there is one.
    aux_by_id = {r.record_id: r.output_tokens for r in aux_train}
    served_ids = {r.record_id for r in train}
    examples = [(r.prompt, r.output_tokens, aux_by_id.get(r.record_id, MISSING)) for r in train]
    examples += [(r.prompt, MISSING, r.output_tokens) for r in aux_train if r.record_id not in served_ids]
    encoder = model.encoder
    tokenized = encoder.tokenize([prompt for prompt, _, _ in examples])
    output_tokens = torch.tensor([n for _, n, _ in examples])
    aux_tokens = torch.tensor([n for _, _, n in examples])
    bucket_ids = torch.tensor([bin_of(max(n, 0), metadata.bucket_boundaries) for _, n, _ in examples])
    num_labelled = len(train)
    model.set_statistics(
        tokenized.num_prompt_tokens[:num_labelled],
        output_tokens[:num_labelled].tolist(),
        bucket_ids[:num_labelled].tolist(),
    )
    cache = encode_cache(
        model, tokenized.token_ids, feature_cache_dir and Path(feature_cache_dir) / metadata_key(metadata)
    )
    fit(
        model, cache, tokenized.num_prompt_tokens, output_tokens, aux_tokens, bucket_ids, num_labelled, config
    )
    return LengthPredictor(model, metadata)


def metadata_key(metadata: PredictorMetadata) -> str:
    """Names the pooled vectors of one frozen encoder configuration (a feature-cache file)."""
    return f"{metadata.encoder}-{metadata.num_encoder_layers}l-{metadata.max_prompt_tokens}t.pt"


def encode_cache(
    model: torch.nn.Module, token_ids: list[list[int]], cache_file: Path | None = None
) -> list[torch.Tensor]:
    """The frozen layers' output per example, once: the pooled vector (H,) when the encoder is frozen,
    else the hidden states entering the first trained layer (T, H) in half precision. With
    ``cache_file`` (frozen encoders only), vectors of token sequences seen before are read from it."""
    encoder = model.encoder
    is_frozen = model.num_finetune_layers == 0
    cache: list[torch.Tensor] = [torch.empty(0)] * len(token_ids)
    stored: dict[str, torch.Tensor] = {}
    keys = [hashlib.sha1(str(ids).encode()).hexdigest() for ids in token_ids]
    if cache_file is not None and is_frozen and cache_file.is_file():
        stored = torch.load(cache_file)
    todo = [i for i in range(len(token_ids)) if keys[i] not in stored]
    for i in range(len(token_ids)):
        if keys[i] in stored:
            cache[i] = stored[keys[i]]
    by_length = sorted(todo, key=lambda i: len(token_ids[i]))
    model.eval()
    # no_grad rather than inference_mode: these tensors feed autograd.
    with torch.no_grad():
        for start in tqdm(range(0, len(by_length), CACHE_BATCH), desc="encoding prompts", unit="batch"):
            rows = by_length[start : start + CACHE_BATCH]
            input_ids, attention_mask = encoder.pad([token_ids[i] for i in rows])
            hidden = model.frozen_hidden(input_ids, attention_mask)  # (B, T, H)
            pooled = encoder.pool(hidden, attention_mask) if is_frozen else None
            for k, i in enumerate(rows):
                # Half precision halves the memory of cached hidden states; they are inputs, not weights.
                cache[i] = pooled[k] if pooled is not None else hidden[k, : len(token_ids[i])].half()
    if cache_file is not None and is_frozen and todo:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(stored | {keys[i]: cache[i].clone() for i in todo}, cache_file)
    return cache


def fit(
    model: torch.nn.Module,
    cache: list[torch.Tensor],
    num_prompt_tokens: list[int],
    output_tokens: torch.Tensor,
    aux_tokens: torch.Tensor,
    bucket_ids: torch.Tensor,
    num_labelled: int,
    config: TrainConfig,
) -> None:
    """Train the head (and any fine-tuned layers). The first ``num_labelled`` examples carry the served
    model's labels, the rest only auxiliary ones; each step takes a batch of each, so both tasks get
    equal weight per step whatever their sizes."""
    is_frozen = model.num_finetune_layers == 0
    trained_layers = list(model.encoder.layers[model.first_trained_layer :].parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": model.head.parameters(), "lr": config.head_learning_rate},
            {"params": trained_layers, "lr": config.encoder_learning_rate},
        ],
        weight_decay=config.weight_decay,
    )
    generator = torch.Generator().manual_seed(config.seed)
    num_aux_only = len(cache) - num_labelled
    # An epoch is one pass over the larger of the two sets; the smaller one is cycled (reshuffled each
    # pass), so every step sees a batch of each and the served labels are never drowned in auxiliary ones.
    labelled = _Cycle(list(range(num_labelled)), generator)
    aux_only = _Cycle(list(range(num_labelled, len(cache))), generator)
    num_steps = -(-max(num_labelled, num_aux_only) // config.batch_size)
    progress = tqdm(range(config.num_epochs), desc="training", unit="epoch")
    for _ in progress:
        model.train()
        total_loss, num_batches = 0.0, 0
        for _ in range(num_steps):
            rows = labelled.take(min(config.batch_size, num_labelled))
            if num_aux_only:
                rows += aux_only.take(config.batch_size)
            prompt_lengths = [num_prompt_tokens[i] for i in rows]
            if is_frozen:
                logits = model.head_logits(torch.stack([cache[i] for i in rows]), prompt_lengths)
            else:
                hidden, attention_mask = _pad_hidden([cache[i] for i in rows])
                logits = model.logits_from_hidden(hidden, attention_mask, prompt_lengths)
            loss = model.loss(logits, output_tokens[rows], bucket_ids[rows], aux_tokens[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += loss.item()
            num_batches += 1
        progress.set_postfix(loss=f"{total_loss / num_batches:.4f}")
    model.eval()


class _Cycle:
    """Endless shuffled passes over a list of example indices."""

    def __init__(self, items: list[int], generator: torch.Generator) -> None:
        self.items, self.generator, self.queue = items, generator, []

    def take(self, num: int) -> list[int]:
        out: list[int] = []
        while len(out) < num and self.items:
            if not self.queue:
                self.queue = [
                    self.items[i] for i in torch.randperm(len(self.items), generator=self.generator)
                ]
            out.append(self.queue.pop())
        return out


def _pad_hidden(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached (T_i, H) half-precision states -> (B, T, H) float32 and the (B, T) attention mask."""
    width = max(s.shape[0] for s in states)
    hidden = torch.zeros(len(states), width, states[0].shape[1])
    attention_mask = torch.zeros(len(states), width, dtype=torch.long)
    for row, state in enumerate(states):
        hidden[row, : state.shape[0]] = state.float()
        attention_mask[row, : state.shape[0]] = 1
    return hidden, attention_mask
