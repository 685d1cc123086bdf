"""The length model: the prompt encoder, a head, and the label space the head predicts in.

The head sees the pooled encoder output and the prompt's (untruncated) length. Three heads:

- ``regression``: output 0 is the standardised ``log1p(output_tokens)`` of the served model; trained with
  a Huber loss (ShareGPT lengths have a long tail that a squared loss would chase) plus, with
  ``rank_loss_weight``, a pairwise ranking loss (RankNet's logistic loss over every pair of a batch whose
  lengths differ), since SSJF needs the order more than the tokens. The Huber term keeps output 0 a
  calibrated length in tokens, which bins, autoscaling and admission need. With ``num_aux_outputs`` 1,
  output 1 predicts ChatGPT's answer length (the ShareGPT response) from the same hidden layer: an
  auxiliary task with ten times the labels, which shapes the hidden layer when the served model's own
  labels are few. Only output 0 is ever read at serving time.
- ``buckets``: one logit per length bucket (training quantiles p25/p50/p75/p99); trained with cross
  entropy. Its length estimate is the probability-weighted mean log length of the buckets.
- ``linear``: output 0 is ``log1p(output_tokens)`` as one linear function of the pooled encoder output, the
  prompt-length features and the prompt's hashed word n-grams (``ngrams.hashed_ngrams``, weights in
  ``ngram_weight``); fitted in closed form, not trained here (``tools/predictor/linear.py``: ridge
  regressions stacked on ChatGPT's lengths, the family that ranks prompts unlike any it saw best).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cluster.predictor.encoder import PromptEncoder
from cluster.predictor.ngrams import hashed_ngrams
from cluster.predictor.served_encoder import ServedModelEncoder

HEADS = ("regression", "buckets", "linear")
NUM_PROMPT_FEATURES = 2
MISSING = -1
"""A target absent from an example (a ShareGPT pair without a served-model label, or the reverse)."""


def prompt_features(num_prompt_tokens: list[int]) -> torch.Tensor:
    """(B, 2): log prompt length and its square, so the head can bend the length trend."""
    log_len = torch.log1p(torch.tensor(num_prompt_tokens, dtype=torch.float32))
    return torch.stack([log_len, log_len**2], dim=1)


class LengthModel(nn.Module):
    def __init__(
        self,
        encoder: PromptEncoder | ServedModelEncoder,
        head: str,
        num_buckets: int,
        num_finetune_layers: int,
        num_hidden: int,
        dropout: float,
        num_aux_outputs: int = 0,
        rank_loss_weight: float = 0.0,
        aux_loss_weight: float = 0.0,
        num_ngram_features: int = 0,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head: must be one of {', '.join(HEADS)}, got {head!r}")
        if head != "regression" and (num_aux_outputs or rank_loss_weight):
            raise ValueError("rank_loss_weight, aux outputs: only with the regression head")
        if num_ngram_features and head != "linear":
            raise ValueError("num_ngram_features: only with the linear head")
        self.encoder = encoder
        self.head_kind = head
        self.num_finetune_layers = num_finetune_layers
        self.num_aux_outputs = num_aux_outputs
        self.rank_loss_weight = rank_loss_weight
        self.aux_loss_weight = aux_loss_weight
        num_outputs = 1 + num_aux_outputs if head == "regression" else num_buckets
        if head == "linear":
            self.head = nn.Linear(encoder.pooled_size + NUM_PROMPT_FEATURES, 1)
        else:
            self.head = nn.Sequential(
                nn.Linear(encoder.pooled_size + NUM_PROMPT_FEATURES, num_hidden),
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
        self.register_buffer("ngram_weight", torch.zeros(num_ngram_features))
        self.encoder.layers[self.first_trained_layer :].requires_grad_(True)

    @property
    def first_trained_layer(self) -> int:
        """Layers below this one are frozen, so their output can be cached during training."""
        return self.encoder.num_layers - self.num_finetune_layers

    def trained_state(self) -> dict[str, torch.Tensor]:
        """What a saved predictor holds: the head, the statistics and any fine-tuned layers."""
        prefixes = ("head.", "feature_", "log_tokens_", "bucket_log_tokens", "ngram_weight")
        prefixes += tuple(
            f"encoder.layers.{i}." for i in range(self.first_trained_layer, self.encoder.num_layers)
        )
        # An empty ngram_weight (every head but a linear one with n-grams) is not saved, so predictors saved
        # before n-gram weights existed still load.
        return {
            k: v.detach().contiguous()
            for k, v in self.state_dict().items()
            if k.startswith(prefixes) and (k != "ngram_weight" or v.numel())
        }

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

    def ngram_logits(self, prompts: list[str]) -> torch.Tensor:
        """(B,) what the prompts' hashed word n-grams add to output 0 (zeros without n-gram weights)."""
        out = torch.zeros(len(prompts))
        if len(self.ngram_weight):
            weight = self.ngram_weight.numpy()
            for row, prompt in enumerate(prompts):
                indices, values = hashed_ngrams(prompt, len(weight))
                out[row] = float(weight[indices] @ values) / float(self.log_tokens_std)
        return out

    def logits_from_hidden(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, num_prompt_tokens: list[int]
    ) -> torch.Tensor:
        """From the cached output of the frozen layers (B, T, H) through the trained ones to the head."""
        hidden = self.encoder.run_layers(
            hidden, attention_mask, self.first_trained_layer, self.encoder.num_layers
        )
        return self.head_logits(self.encoder.pool(hidden, attention_mask), num_prompt_tokens)

    def frozen_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, H), the output of the frozen layers."""
        hidden = self.encoder.embed(input_ids)
        return self.encoder.run_layers(hidden, attention_mask, 0, self.first_trained_layer)

    def loss(
        self,
        logits: torch.Tensor,
        output_tokens: torch.Tensor,
        bucket_ids: torch.Tensor,
        aux_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Targets are (B,) with ``MISSING`` where an example lacks one; a batch may hold only aux ones."""
        has_label = output_tokens != MISSING
        if self.head_kind == "buckets":
            return nn.functional.cross_entropy(logits[has_label], bucket_ids[has_label])
        loss = logits.new_zeros(())
        if has_label.any():
            score = logits[has_label, 0]
            target = self.standardise(output_tokens[has_label])
            loss = loss + nn.functional.huber_loss(score, target, delta=1.0)
            if self.rank_loss_weight:
                loss = loss + self.rank_loss_weight * pairwise_rank_loss(score, target)
        if aux_tokens is not None and self.num_aux_outputs:
            has_aux = aux_tokens != MISSING
            if has_aux.any():
                aux = nn.functional.huber_loss(logits[has_aux, 1], self.standardise(aux_tokens[has_aux]))
                loss = loss + self.aux_loss_weight * aux
        return loss

    def standardise(self, output_tokens: torch.Tensor) -> torch.Tensor:
        return (torch.log1p(output_tokens.float()) - self.log_tokens_mean) / self.log_tokens_std

    def decode(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log1p length estimate (B,), bucket ids (B,) for the bucket head, else None)."""
        if self.head_kind in ("regression", "linear"):
            return logits[:, 0] * self.log_tokens_std + self.log_tokens_mean, None
        probs = logits.softmax(dim=-1)  # (B, num_buckets)
        return probs @ self.bucket_log_tokens, probs.argmax(dim=-1)


def pairwise_rank_loss(score: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """RankNet: the mean of ``log(1 + exp(-(s_i - s_j)))`` over the pairs with ``target_i > target_j``
    (ties, such as two answers cut at ``max_tokens``, say nothing about order and are skipped)."""
    score_diff = score[:, None] - score[None, :]  # (B, B): s_i - s_j
    is_ordered = target[:, None] > target[None, :]
    if not is_ordered.any():
        return score.new_zeros(())
    return nn.functional.softplus(-score_diff[is_ordered]).mean()


def tokens_from_log(log_tokens: float) -> int:
    """An integer length from a log1p estimate; at least 1, since every response has an end token."""
    return max(1, round(math.expm1(log_tokens)))
