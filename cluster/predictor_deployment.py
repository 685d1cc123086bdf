"""The global length predictor: one Serve deployment that every ingress replica asks for output lengths.

    predictor = LengthPredictorDeployment.bind(PredictorConfig(), model_dir)  # the default shipped predictor
    predicted_output_tokens = await handle.predict.remote("Write a haiku about paged attention.")

Concurrent calls are batched (``@serve.batch``): the encoder runs once per batch, which is what makes a
per-request prediction cheap. The bin boundaries come from the same predictor (equal-mass intervals of
its training length distribution), so predictions and bins always agree.

Given the served model's directory, the replica warns at start-up when the predictor learned another
model's (or tokenizer's) lengths, and a predictor whose encoder is the served model's first layers loads
them from there.
"""

from __future__ import annotations

import asyncio

from ray import serve

from cluster.config import PredictorConfig
from cluster.prometheus import PredictorMetrics


@serve.deployment
class LengthPredictorDeployment:
    def __init__(self, config: PredictorConfig, model_dir: str | None = None) -> None:
        from cluster.predictor_client import PredictionCache, load_predictor

        self.predictor = load_predictor(config, model_dir)
        self.cache = PredictionCache(config.cache_size)
        self.metrics = PredictorMetrics()
        self.predict.set_max_batch_size(config.max_batch_size)
        self.predict.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def predict(self, prompts: list[str]) -> list[int]:
        """Predicted output tokens per prompt. Callers pass one prompt; Serve hands this a batch."""
        # The encoder blocks for milliseconds; a worker thread keeps this replica's event loop (health
        # checks, the next batch's intake) responsive meanwhile.
        self.metrics.observe_batch(len(prompts))
        known = [self.cache.get(p) for p in prompts]
        unknown = [p for p, tokens in zip(prompts, known, strict=True) if tokens is None]
        if unknown:
            prediction = iter((await asyncio.to_thread(self.predictor.predict, unknown)).output_tokens)
            known = [int(next(prediction)) if tokens is None else tokens for tokens in known]
            for prompt, tokens in zip(prompts, known, strict=True):
                self.cache.put(prompt, tokens)
        return known

    def bin_boundaries(self, num_bins: int) -> list[int]:
        """Inclusive upper edges of ``num_bins`` equal-mass bins of the training output lengths."""
        return [int(b) for b in self.predictor.bin_boundaries(num_bins)]
