"""The served model's own first layers as the prompt encoder (TRAIL's idea, without the decoding part).

    encoder = ServedModelEncoder(".models/smollm2-135m-instruct", num_layers=2, max_prompt_tokens=48)

A Llama-family checkpoint's token embeddings and its first ``num_layers`` decoder layers (frozen; the rest
is never loaded into the model), run over the prompt as the chat template frames a user turn
(``<|im_start|>user\\n`` head ... tail ``<|im_end|>\\n<|im_start|>assistant\\n``), then pooled: the mean
over the real tokens and the last token's state (the position that is about to answer), concatenated.
The states are those after the model's final RMSNorm, so every token counts at the same scale.

The template's default system prompt is left out: it is the same for every prompt, so it carries no
signal, and it would double the tokens each prompt costs (encoder time grows with the padded length).
Causal attention with right padding needs no padding mask: a real token only sees the real tokens
before it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cluster.predictor.encoder import TokenizedPrompts

USER_PREFIX = "<|im_start|>user\n"
ASSISTANT_PREFIX = "<|im_end|>\n<|im_start|>assistant\n"


class ServedModelEncoder(nn.Module):
    def __init__(self, model_dir: str | Path, num_layers: int, max_prompt_tokens: int) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        if not Path(model_dir).is_dir():
            raise ValueError(f"model_dir: no such model directory {model_dir}")
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the layers past num_layers are "unexpected": on purpose
        try:
            self.model = AutoModel.from_pretrained(
                str(model_dir), num_hidden_layers=num_layers, local_files_only=True, dtype=torch.float32
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        self.prefix_ids = self.tokenizer(USER_PREFIX, add_special_tokens=False)["input_ids"]
        self.suffix_ids = self.tokenizer(ASSISTANT_PREFIX, add_special_tokens=False)["input_ids"]
        self.max_prompt_tokens = max_prompt_tokens
        self.pad_token_id = self.tokenizer.pad_token_id or 0
        self.eval()
        self.requires_grad_(False)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def num_layers(self) -> int:
        return len(self.model.layers)

    @property
    def pooled_size(self) -> int:
        return 2 * self.model.config.hidden_size

    def tokenize(self, prompts: list[str]) -> TokenizedPrompts:
        pieces = self.tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"]
        num_head = self.max_prompt_tokens // 2
        token_ids = []
        for ids in pieces:
            if len(ids) > self.max_prompt_tokens:
                ids = ids[:num_head] + ids[len(ids) - (self.max_prompt_tokens - num_head) :]
            token_ids.append([*self.prefix_ids, *ids, *self.suffix_ids])
        return TokenizedPrompts(token_ids, [len(ids) for ids in pieces])

    def pad(self, token_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both (B, T), right-padded to the longest prompt in the batch."""
        width = max(len(ids) for ids in token_ids)
        input_ids = torch.full((len(token_ids), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(token_ids), width), dtype=torch.long)
        for row, ids in enumerate(token_ids):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        return input_ids, attention_mask

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)  # (B, T, H)

    def run_layers(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int
    ) -> torch.Tensor:
        """Decoder layers ``start:stop`` on (B, T, H), causally (no mask: see the module's docstring)."""
        positions = torch.arange(hidden.shape[1])[None]  # (1, T)
        rotary = self.model.rotary_emb(hidden, positions)
        for layer in self.model.layers[start:stop]:
            hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return hidden

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B, 2H): after the final norm, the mean over real tokens and the last real token."""
        hidden = self.model.norm(hidden)
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        mean = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
        last = hidden[torch.arange(hidden.shape[0]), attention_mask.sum(dim=1) - 1]  # (B, H)
        return torch.cat([mean, last], dim=1)
