"""How the ingress asks for an output length: in its own process (the default), or from the predictor
deployment. Both answer ``await predict(prompt) -> tokens`` and ``await bin_boundaries(num_bins)``.

    predictor = InProcessPredictor(PredictorConfig(), model_dir)     # predictor.placement: ingress
    predictor = RemotePredictor(handle)                              # predictor.placement: deployment
    predicted_output_tokens = await predictor.predict("Write a haiku about paged attention.")

In process, the prompt-only predictor costs the ingress no hop: a call to its own deployment is an actor
round trip, a queue-length probe and (de)serialisation (measured in ``docs/PREDICTOR.md``:
tens of ms p50 on this machine, against a 5 ms budget). Prompts that arrive while a batch is being
encoded wait for the next one, so the batch grows with the load and a lone request waits for nothing.
The encoder runs in a worker thread, keeping the ingress's event loop free.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from ray.serve.handle import DeploymentHandle

from cluster.config import PredictorConfig
from cluster.prometheus import PredictorMetrics


class PredictorClient(Protocol):
    async def predict(self, prompt: str) -> int: ...

    async def bin_boundaries(self, num_bins: int) -> list[int]: ...


class RemotePredictor:
    """The ``LengthPredictorDeployment`` through its handle (``@serve.batch`` batches there)."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def predict(self, prompt: str) -> int:
        return await self.handle.predict.remote(prompt)

    async def bin_boundaries(self, num_bins: int) -> list[int]:
        return await self.handle.bin_boundaries.remote(num_bins)


def load_predictor(config: PredictorConfig, model_dir: str | None = None):
    """The configured predictor (one torch thread), warned about when it learned another model's lengths."""
    import torch

    from cluster.predictor import LengthPredictor

    torch.set_num_threads(1)
    predictor = LengthPredictor.load(config.path, model_dir=model_dir)
    if model_dir is not None:
        predictor.check_served_model(model_dir)
    return predictor


class InProcessPredictor:
    def __init__(self, config: PredictorConfig, model_dir: str | None = None) -> None:
        self.predictor = load_predictor(config, model_dir)
        self.max_batch_size = config.max_batch_size
        self.metrics = PredictorMetrics()
        self._waiting: list[tuple[str, asyncio.Future[int]]] = []
        self._encoding: asyncio.Task | None = None

    async def predict(self, prompt: str) -> int:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((prompt, future))
        if self._encoding is None or self._encoding.done():
            self._encoding = asyncio.create_task(self._encode_waiting())
        return await future

    async def _encode_waiting(self) -> None:
        while self._waiting:
            batch = self._waiting[: self.max_batch_size]
            del self._waiting[: self.max_batch_size]
            self.metrics.observe_batch(len(batch))
            try:
                prediction = await asyncio.to_thread(self.predictor.predict, [p for p, _ in batch])
            except Exception as exc:  # every caller of the batch gets the failure
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), tokens in zip(batch, prediction.output_tokens, strict=True):
                if not future.done():  # a caller that left (cancelled) needs no answer
                    future.set_result(int(tokens))

    async def bin_boundaries(self, num_bins: int) -> list[int]:
        return [int(b) for b in self.predictor.bin_boundaries(num_bins)]
