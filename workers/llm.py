"""Text in, text out: the tokenizer, a runner and the engine put together for one process.

llm = LLM(EngineConfig(ModelConfig("/tmp/tiny")))
[done] = llm.generate(["Hello"], SamplingParams(max_tokens=16))        # greedy, as given
[answer] = llm.chat([[ChatMessage("user", "Hi!")]], llm.default_sampling_params(max_tokens=64))
print(done.text, answer.text)

With ``ParallelConfig(pp_size=N)``, N > 1, the model runs as a pipeline of N stage actors (Ray is
started here if it is not up) with N micro-batches in flight; ``shutdown()`` ends them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

from pipeline.chat import ChatMessage, render_chat
from pipeline.config import EngineConfig
from pipeline.engine import Completion, Engine, Runner
from pipeline.request import SamplingParams
from pipeline.scheduler import Scheduler
from workers.checkpoint import eos_token_ids, load_config, load_tokenizer, model_sampling_defaults_of
from workers.runner import ModelRunner

logger = logging.getLogger(__name__)


def build_engine(config: EngineConfig, runner: Runner) -> Engine:
    """Wire a scheduler sized to the runner's KV pool to the runner; check the pool fits a sequence.

    A ``max_model_len`` left unset is the model's context length, capped to what the KV pool holds (with a
    one-line note): SmolLM2's 8,192 tokens need more than the CPU's default pool. One set explicitly must fit."""
    hf_config = load_config(config.model.model_dir)
    capacity_tokens = runner.num_blocks * config.cache.block_size
    max_model_len = config.model.max_model_len or hf_config.max_position_embeddings
    if capacity_tokens < max_model_len:
        if config.model.max_model_len is not None:
            raise ValueError(
                f"kv cache: {runner.num_blocks} blocks of {config.cache.block_size} tokens hold {capacity_tokens} "
                f"tokens, fewer than max_model_len {max_model_len}; raise kv_cache_bytes (or num_blocks) or lower "
                "max_model_len"
            )
        logger.warning(
            "max_model_len: %d tokens, what the KV cache holds (the model allows %d; raise kv_cache_bytes for more)",
            capacity_tokens,
            max_model_len,
        )
        max_model_len = capacity_tokens
    scheduler = Scheduler(
        config.scheduler,
        num_blocks=runner.num_blocks,
        block_size=config.cache.block_size,
        max_model_len=max_model_len,
        eos_token_ids=eos_token_ids(config.model.model_dir, hf_config),
        enable_prefix_caching=config.cache.enable_prefix_caching,
    )
    return Engine(runner, scheduler)


@dataclass(frozen=True)
class TextCompletion:
    text: str
    completion: Completion


class LLM:
    def __init__(self, config: EngineConfig, runner: Runner | None = None) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config.model.model_dir)
        # Read once: every generate() without params takes them.
        self.model_sampling = SamplingParams(**model_sampling_defaults_of(config.model.model_dir))
        if runner is None:
            if config.parallel.uses_stage_actors:  # Ray is imported only for stage actors: one process needs none
                from workers.pipeline_runner import build_pipeline_runner

                runner = build_pipeline_runner(config)
            else:
                runner = ModelRunner(config.model, config.cache)
        self.runner = runner
        # generate() keeps runner.depth plans in flight: pp_size micro-batches through a pipeline.
        self.engine = build_engine(config, runner)

    def encode(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt: must be a non-empty string")
        return self.tokenizer(prompt).input_ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def default_sampling_params(self, **overrides) -> SamplingParams:
        """The model's serving defaults (its ``generation_config.json``, as transformers' ``generate`` and the
        server apply them; SmolLM2: temperature 0.7, top_p 0.9, repetition_penalty 1.1), then ``overrides``.
        ``SamplingParams()`` itself is plain greedy: pass one for exact control."""
        return replace(self.model_sampling, **overrides)

    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[TextCompletion]:
        """Complete each prompt as given (no chat template); ``params=None`` is the model's defaults."""
        return self._complete([self.encode(p) for p in prompts], params)

    def chat(
        self,
        conversations: Sequence[Sequence[ChatMessage]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[TextCompletion]:
        """Answer each conversation, rendered with the model's chat template exactly as the server and
        transformers' ``apply_chat_template(..., add_generation_prompt=True)`` render it."""
        rendered = [render_chat(self.tokenizer, messages) for messages in conversations]
        # The template carries its own special tokens.
        return self._complete([self.tokenizer(t, add_special_tokens=False).input_ids for t in rendered], params)

    def _complete(
        self, token_ids: list[list[int]], params: SamplingParams | Sequence[SamplingParams] | None
    ) -> list[TextCompletion]:
        done = self.engine.generate(token_ids, self.default_sampling_params() if params is None else params)
        return [TextCompletion(self.decode(c.output_token_ids), c) for c in done]

    def shutdown(self) -> None:
        """End the stage actors of a pipelined LLM (a no-op for one process)."""
        shutdown = getattr(self.runner, "shutdown", None)  # a pipeline's stage actors
        if shutdown is not None:
            shutdown()
