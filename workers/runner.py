"""The model runner: one stage of a model on one device, with its share of the paged KV cache.

    runner = ModelRunner(ModelConfig("/tmp/tiny"), CacheConfig())          # all layers
    runner.submit(plan)
    output = runner.collect()                                              # a StepOutput

As an engine's runner it holds every layer (``depth`` 1: ``collect`` computes the plan). A pipeline
stage holds a layer range: ``forward_stage(plan, hidden)`` returns hidden states for the next stage, and
on the last stage the sampled tokens.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

import torch
from transformers import PretrainedConfig

from pipeline.config import CacheConfig, ModelConfig
from pipeline.plan import ScheduledChunk, StepOutput, StepPlan
from workers.attention import AttentionMetadata
from workers.checkpoint import iter_weights, load_config
from workers.length_probe import LengthProbe
from workers.malloc import keep_freed_memory
from workers.model import DecoderStage, head_dim_of, sliding_window_of
from workers.partition import kv_block_bytes
from workers.sampler import sample

LengthProbeFn = Callable[[Sequence[ScheduledChunk], torch.Tensor], tuple[int | None, ...]]
"""(sampling chunks, their final-normed hidden states (N, H)) -> a refined whole-output length per row."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def kv_capacity_blocks(
    hf_config: PretrainedConfig,
    num_layers: int,
    cache: CacheConfig,
    device: torch.device,
    dtype: torch.dtype,
    weight_bytes_to_load: int = 0,
) -> int:
    """KV blocks ``num_layers`` layers can hold under ``cache``'s budget: its bytes on CPU; on CUDA a
    share of the free memory once ``weight_bytes_to_load`` more bytes of weights are in."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    if device.type == "cuda":
        # Blocks PyTorch's caching allocator holds but no tensor uses are free for the KV pool.
        torch.cuda.empty_cache()
        free_bytes, _ = torch.cuda.mem_get_info(device)
        budget = int((free_bytes - weight_bytes_to_load) * cache.gpu_memory_fraction)
    else:
        budget = cache.kv_cache_bytes
    return max(1, budget // kv_block_bytes(hf_config, num_layers, cache.block_size, dtype))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def empty_stage(
    hf_config: PretrainedConfig, start: int, end: int, dtype: torch.dtype, device: torch.device
) -> DecoderStage:
    """Layers ``[start, end)`` with uninitialised weights of ``dtype`` on ``device``, ready to load.

    Built on the meta device, so a large checkpoint is not first filled with random weights, and cast
    there: materialising in fp32 and then casting would peak at 6 bytes a parameter for a bf16 model and
    leave 4 of them in PyTorch's caching allocator, where the KV pool's sizing would not count them free.
    """
    with torch.device("meta"):
        stage = DecoderStage(hf_config, start, end).to(dtype)
    return stage.to_empty(device=device)


class ModelRunner:
    depth = 1
    """Plans in flight at once: this runner computes each plan when it is collected."""

    def __init__(
        self,
        model: ModelConfig,
        cache: CacheConfig,
        layer_range: tuple[int, int] | None = None,
        length_probe: LengthProbeFn | None = None,
    ) -> None:
        """``length_probe``: called on the last stage with each step's sampled rows; default: the probe
        at ``model.length_probe``, if set."""
        self.hf_config = load_config(model.model_dir)
        self.device = resolve_device(model.device)
        self.dtype = resolve_dtype(model.dtype, self.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        start, end = layer_range or (0, self.hf_config.num_hidden_layers)
        self.stage = self._load_stage(model.model_dir, start, end)
        if length_probe is None and model.length_probe is not None and self.stage.is_last:
            length_probe = LengthProbe.load(model.length_probe, self.hf_config.hidden_size)
        self.length_probe = length_probe
        self._pending: collections.deque[StepPlan] = collections.deque()
        self.block_size = cache.block_size
        self.sliding_window = sliding_window_of(self.hf_config)
        self.num_blocks = cache.num_blocks or self._num_blocks_for_budget(cache)
        num_kv_heads = (
            getattr(self.hf_config, "num_key_value_heads", None) or self.hf_config.num_attention_heads
        )
        # One tensor per layer: (2, Hkv, num_blocks, block_size, D), keys then values (see attention.py).
        self.kv_caches = [
            torch.zeros(
                2,
                num_kv_heads,
                self.num_blocks,
                self.block_size,
                head_dim_of(self.hf_config),
                dtype=self.dtype,
                device=self.device,
            )
            for _ in range(end - start)
        ]

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size

    @property
    def is_first(self) -> bool:
        return self.stage.is_first

    @property
    def is_last(self) -> bool:
        return self.stage.is_last

    def _load_stage(self, model_dir: str, start: int, end: int) -> DecoderStage:
        stage = empty_stage(self.hf_config, start, end, self.dtype, self.device)
        params = dict(stage.named_parameters())
        targets: dict[str, list[str]] = {}
        for name in params:
            targets.setdefault(stage.checkpoint_name(name), []).append(name)
        if stage.lm_head is not None and getattr(self.hf_config, "tie_word_embeddings", False):
            targets.setdefault("model.embed_tokens.weight", []).append("lm_head.weight")
        loaded: set[str] = set()
        with torch.no_grad():
            for ckpt_name, tensor in iter_weights(model_dir, lambda n: n in targets):
                for name in targets[ckpt_name]:
                    params[name].copy_(tensor.to(self.dtype))
                    loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"model: checkpoint {model_dir!r} lacks weights for {', '.join(missing[:5])}")
        return stage.eval()

    def _num_blocks_for_budget(self, cache: CacheConfig) -> int:
        num_layers = self.stage.layer_end - self.stage.layer_start
        return kv_capacity_blocks(self.hf_config, num_layers, cache, self.device, self.dtype)

    @torch.inference_mode()
    def forward_stage(self, plan: StepPlan, inputs: torch.Tensor | None = None) -> torch.Tensor | StepOutput:
        """Run this stage on a plan: token ids come from the plan on the first stage, hidden states
        from ``inputs`` otherwise. Returns hidden states, or the sampled tokens on the last stage."""
        meta = AttentionMetadata.build(plan, self.block_size, self.sliding_window, self.device)
        if self.stage.is_first:
            inputs = torch.tensor(
                [t for c in plan.chunks for t in c.token_ids], dtype=torch.long, device=self.device
            )
        hidden = self.stage(inputs.to(self.device), self.kv_caches, meta)
        if not self.stage.is_last:
            return hidden
        # Only the last position of each chunk that completes its prefix is sampled.
        rows, offset = [], 0
        for chunk in plan.chunks:
            offset += chunk.num_tokens
            if chunk.sampling is not None:
                rows.append(offset - 1)
        if not rows:
            return StepOutput(plan.step_id, ())
        hidden = hidden[torch.tensor(rows, device=self.device)]
        logits = self.stage.lm_head(hidden).float()  # (N, V)
        refined = () if self.length_probe is None else self.length_probe(plan.sampling_chunks, hidden)
        return StepOutput(plan.step_id, tuple(sample(logits, plan.sampling_chunks)), refined)

    # ---- the engine's Runner interface (a runner that holds every layer) --------------------------

    def submit(self, plan: StepPlan) -> None:
        self._pending.append(plan)

    def collect(self) -> StepOutput:
        output = self.forward_stage(self._pending.popleft())
        assert isinstance(output, StepOutput), "an engine's ModelRunner holds every layer"
        return output
