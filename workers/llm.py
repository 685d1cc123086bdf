"""Text in, text out: the tokenizer, a runner and the engine put together for one process.

llm = LLM(EngineConfig(ModelConfig("/tmp/tiny")))
[done] = llm.generate(["Hello"], SamplingParams(max_tokens=16))
print(done.text, done.finish_reason)

With ``ParallelConfig(pp_size=N)``, N > 1, the model runs as a pipeline of N stage actors (Ray is
started here if it is not up) with N micro-batches in flight; ``shutdown()`` ends them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.config import EngineConfig
from pipeline.engine import Completion, Engine, Runner
from pipeline.request import SamplingParams
from pipeline.scheduler import Scheduler
from workers.checkpoint import eos_token_ids, load_config, load_tokenizer
from workers.runner import ModelRunner


def build_engine(config: EngineConfig, runner: Runner) -> Engine:
    """Wire a scheduler sized to the runner's KV pool to the runner; check the pool fits a sequence."""
    hf_config = load_config(config.model.model_dir)
    max_model_len = config.model.max_model_len or hf_config.max_position_embeddings
    scheduler = Scheduler(
        config.scheduler,
        num_blocks=runner.num_blocks,
        block_size=config.cache.block_size,
        max_model_len=max_model_len,
        eos_token_ids=eos_token_ids(config.model.model_dir, hf_config),
        enable_prefix_caching=config.cache.enable_prefix_caching,
    )
    capacity_tokens = scheduler.block_manager.capacity_tokens
    if capacity_tokens < max_model_len:
        raise ValueError(
            f"kv cache: {runner.num_blocks} blocks of {config.cache.block_size} tokens hold {capacity_tokens} "
            f"tokens, fewer than max_model_len {max_model_len}; raise kv_cache_bytes (or num_blocks) or lower "
            "max_model_len"
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
        if runner is None:
            is_pipeline = config.parallel.pp_size > 1
            if is_pipeline:  # Ray is imported only for a pipeline: one process needs none
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

    def generate(
        self, prompts: Sequence[str], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[TextCompletion]:
        token_ids = [self.encode(p) for p in prompts]
        done = self.engine.generate(token_ids, params)
        return [TextCompletion(self.decode(c.output_token_ids), c) for c in done]

    def shutdown(self) -> None:
        """End the stage actors of a pipelined LLM (a no-op for one process)."""
        shutdown = getattr(self.runner, "shutdown", None)  # a pipeline's stage actors
        if shutdown is not None:
            shutdown()
