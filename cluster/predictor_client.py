"""How the ingress asks for an output length: in its own process (the default), or from the predictor
deployment. Both answer ``predict(prompt)`` with an awaitable that is already under way, and
``await bin_boundaries(num_bins)``.

    predictor = InProcessPredictor(PredictorConfig(), model_dir)     # predictor.placement: ingress
    predictor = RemotePredictor(handle)                              # predictor.placement: deployment
    prediction = predictor.predict("Write a haiku about paged attention.")   # starts now
    ...                                                              # tokenize, render the chat meanwhile
    predicted_output_tokens = await prediction

``predict`` is a plain method, not a coroutine, so that the encoder starts before the caller's next line:
the ingress tokenizes the prompt while the encoder reads it (``cluster/generation.py``).

In process, the prompt-only predictor costs the ingress no hop: a call to its own deployment is an actor
round trip, a queue-length probe and (de)serialisation (measured in ``docs/PREDICTOR.md``:
tens of ms p50 on this machine, against a 5 ms budget). A prompt that finds the encoder free starts a
batch of its own at once; prompts that arrive while a batch is being encoded wait for the next one, so
the batch grows with the load and a lone request waits for nothing. The encoder runs in a worker thread,
keeping the ingress's event loop free. A prompt seen recently is answered from ``PredictionCache``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Awaitable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from ray.serve.handle import DeploymentHandle

from cluster.config import PredictorConfig
from cluster.prometheus import PredictorMetrics


class PredictorClient(Protocol):
    def predict(self, prompt: str) -> Awaitable[int]:
        """Start predicting ``prompt``'s output tokens now; await the answer (or ``cancel()`` it)."""
        ...

    async def bin_boundaries(self, num_bins: int) -> list[int]: ...


class RemotePredictor:
    """The ``LengthPredictorDeployment`` through its handle (``@serve.batch`` batches there)."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    def predict(self, prompt: str) -> Awaitable[int]:
        return self.handle.predict.remote(prompt)  # sent now; a DeploymentResponse, awaitable, cancellable

    async def bin_boundaries(self, num_bins: int) -> list[int]:
        return await self.handle.bin_boundaries.remote(num_bins)


def load_predictor(config: PredictorConfig, model_dir: str | None = None):
    """The configured predictor, run as ``config`` says (precision, prompt tokens, torch threads), warned
    about when it learned another model's lengths."""
    import torch

    from cluster.predictor import LengthPredictor

    torch.set_num_threads(config.torch_threads)
    predictor = LengthPredictor.load(
        config.path,
        model_dir=model_dir,
        encoder_precision=config.encoder_precision,
        max_prompt_tokens=config.max_prompt_tokens,
    )
    if model_dir is not None:
        predictor.check_served_model(model_dir)
    return predictor


class PredictionCache:
    """The last ``max_size`` prompts' predicted output tokens, keyed by a 128-bit digest of the prompt (a
    prompt may be 256 KiB; its digest is 16 bytes). ``max_size`` 0 keeps nothing."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._tokens: OrderedDict[bytes, int] = OrderedDict()

    @staticmethod
    def key(prompt: str) -> bytes:
        return hashlib.blake2b(prompt.encode(), digest_size=16).digest()

    def get(self, prompt: str) -> int | None:
        key = self.key(prompt)
        tokens = self._tokens.get(key)
        if tokens is not None:
            self._tokens.move_to_end(key)
        return tokens

    def put(self, prompt: str, tokens: int) -> None:
        if self.max_size == 0:
            return
        self._tokens[self.key(prompt)] = tokens
        self._tokens.move_to_end(self.key(prompt))
        if len(self._tokens) > self.max_size:
            self._tokens.popitem(last=False)


class InProcessPredictor:
    def __init__(self, config: PredictorConfig, model_dir: str | None = None) -> None:
        self.predictor = load_predictor(config, model_dir)
        self.max_batch_size = config.max_batch_size
        self.cache = PredictionCache(config.cache_size)
        self.metrics = PredictorMetrics()
        self._waiting: list[tuple[str, asyncio.Future[int]]] = []
        self._is_encoding = False
        # One encoder thread: a second batch could only queue behind the first for the same cores.
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="length-predictor")

    def predict(self, prompt: str) -> asyncio.Future[int]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        tokens = self.cache.get(prompt)
        if tokens is not None:
            future.set_result(tokens)
            return future
        self._waiting.append((prompt, future))
        if not self._is_encoding:
            self._encode_next(loop)
        return future

    def _encode_next(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand the waiting prompts (up to ``max_batch_size``) to the encoder thread, now."""
        batch: list[tuple[str, asyncio.Future[int]]] = []
        while self._waiting and not batch:
            batch = [(p, f) for p, f in self._waiting[: self.max_batch_size] if not f.cancelled()]
            del self._waiting[: self.max_batch_size]
        if not batch:
            return
        self._is_encoding = True
        self.metrics.observe_batch(len(batch))
        encoding = self._encoder.submit(self.predictor.predict, [p for p, _ in batch])
        encoding.add_done_callback(lambda done: loop.call_soon_threadsafe(self._answer, batch, done, loop))

    def _answer(
        self, batch: list[tuple[str, asyncio.Future[int]]], done: Future, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._is_encoding = False
        failure = done.exception()
        for index, (prompt, future) in enumerate(batch):
            if failure is None:
                tokens = int(done.result().output_tokens[index])
                self.cache.put(prompt, tokens)
            if future.done():  # a caller that left (cancelled) needs no answer
                continue
            if failure is None:
                future.set_result(tokens)
            else:  # every caller of the batch gets the failure
                future.set_exception(failure)
        if self._waiting:
            self._encode_next(loop)

    async def bin_boundaries(self, num_bins: int) -> list[int]:
        return [int(b) for b in self.predictor.bin_boundaries(num_bins)]
