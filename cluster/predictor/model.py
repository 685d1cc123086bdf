"""The length model: the prompt encoder, an MLP head, and the label space the head predicts in.

The head sees the mean-pooled encoder output and the prompt's (untruncated) length. Two heads:

- ``regression``: one output, the standardised ``log1p(output_tokens)``; trained with a Huber loss,
  since ShareGPT lengths have a long tail that a squared loss would chase.
- ``buckets``: one logit per length bucket (training quantiles p25/p50/p75/p99); trained with cross
  entropy. Its length estimate is the probability-weighted mean log length of the buckets.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cluster.predictor.encoder import HIDDEN_SIZE, PromptEncoder

HEADS = ("regression", "buckets")
NUM_PROMPT_FEATURES = 2


def prompt_features(num_prompt_tokens: list[int]) -> torch.Tensor:
    """(B, 2): log prompt length and its square, so the head can bend the length trend."""
    log_len = torch.log1p(torch.tensor(num_prompt_tokens, dtype=torch.float32))
    return torch.stack([log_len, log_len**2], dim=1)


class LengthModel(nn.Module):
    def __init__(
        self,
        encoder: PromptEncoder,
        head: str,
        num_buckets: int,
        num_finetune_layers: int,
        num_hidden: int,
        dropout: float,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head: must be one of {', '.join(HEADS)}, got {head!r}")
        self.encoder = encoder
        self.head_kind = head
        self.num_finetune_layers = num_finetune_layers
        num_outputs = 1 if head == "regression" else num_buckets
        self.head = nn.Sequential(
            nn.Linear(HIDDEN_SIZE + NUM_PROMPT_FEATURES, num_hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(num_hidden, num_outputs),
        )
        # Label and feature statistics of the training set; buffers, so they travel with the weights.
        self.register_buffer("feature_mean", torch.zeros(NUM_PROMPT_FEATURES))
        self.register_buffer("feature_std", torch.ones(NUM_PROMPT_FEATURES))
        self.register_buffer("log_tokens_mean", torch.zeros(()))
        self.register_buffer("log_tokens_std", torch.ones(()))
        self.register_buffer("bucket_log_tokens", torch.zeros(num_buckets))
        self.encoder.layers[self.first_trained_layer :].requires_grad_(True)

    @property
    def first_trained_layer(self) -> int:
        """Layers below this one are frozen, so their output can be cached during training."""
        return self.encoder.num_layers - self.num_finetune_layers

    def trained_state(self) -> dict[str, torch.Tensor]:
        """What a saved predictor holds: the head, the statistics and any fine-tuned layers."""
        prefixes = ("head.", "feature_", "log_tokens_", "bucket_log_tokens")
        prefixes += tuple(
            f"encoder.layers.{i}." for i in range(self.first_trained_layer, self.encoder.num_layers)
        )
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if k.startswith(prefixes)}

    def set_statistics(
        self, num_prompt_tokens: list[int], output_tokens: list[int], bucket_ids: list[int]
    ) -> None:
        features = prompt_features(num_prompt_tokens)
        self.feature_mean.copy_(features.mean(dim=0))
        self.feature_std.copy_(features.std(dim=0).clamp_min(1e-6))
        log_tokens = torch.log1p(torch.tensor(output_tokens, dtype=torch.float32))
        self.log_tokens_mean.copy_(log_tokens.mean())
        self.log_tokens_std.copy_(log_tokens.std().clamp_min(1e-6))
        ids = torch.tensor(bucket_ids)
        for bucket in range(len(self.bucket_log_tokens)):
            in_bucket = log_tokens[ids == bucket]
            # An empty bucket (tiny training sets) sits at the overall mean rather than at NaN.
            self.bucket_log_tokens[bucket] = in_bucket.mean() if len(in_bucket) else log_tokens.mean()

    def head_logits(self, pooled: torch.Tensor, num_prompt_tokens: list[int]) -> torch.Tensor:
        """(B, H) pooled prompts -> (B, 1) standardised log length, or (B, num_buckets) logits."""
        features = (prompt_features(num_prompt_tokens) - self.feature_mean) / self.feature_std
        return self.head(torch.cat([pooled, features], dim=1))

    def logits_from_hidden(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, num_prompt_tokens: list[int]
    ) -> torch.Tensor:
        """From the cached output of the frozen layers (B, T, H) through the trained ones to the head."""
        hidden = self.encoder.run_layers(
            hidden, attention_mask, self.first_trained_layer, self.encoder.num_layers
        )
        return self.head_logits(self.encoder.mean_pool(hidden, attention_mask), num_prompt_tokens)

    def frozen_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, H), the output of the frozen layers."""
        hidden = self.encoder.embeddings(input_ids=input_ids)
        return self.encoder.run_layers(hidden, attention_mask, 0, self.first_trained_layer)

    def loss(
        self, logits: torch.Tensor, output_tokens: torch.Tensor, bucket_ids: torch.Tensor
    ) -> torch.Tensor:
        if self.head_kind == "regression":
            target = (torch.log1p(output_tokens.float()) - self.log_tokens_mean) / self.log_tokens_std
            return nn.functional.huber_loss(logits[:, 0], target, delta=1.0)
        return nn.functional.cross_entropy(logits, bucket_ids)

    def decode(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log1p length estimate (B,), bucket ids (B,) for the bucket head, else None)."""
        if self.head_kind == "regression":
            return logits[:, 0] * self.log_tokens_std + self.log_tokens_mean, None
        probs = logits.softmax(dim=-1)  # (B, num_buckets)
        return probs @ self.bucket_log_tokens, probs.argmax(dim=-1)


def tokens_from_log(log_tokens: float) -> int:
    """An integer length from a log1p estimate; at least 1, since every response has an end token."""
    return max(1, round(math.expm1(log_tokens)))
