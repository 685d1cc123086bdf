"""The engine driver: a background loop that keeps the runner busy and streams tokens to asyncio callers.

    driver = EngineDriver(engine)            # the engine's runner: one process or a pipeline of stage actors
    driver.start()
    async for out in driver.generate(NewRequest("r1", prompt_token_ids, SamplingParams(max_tokens=32))):
        ...
    driver.stop()

The loop runs in its own thread (model execution blocks; torch releases the GIL). It keeps up to
``runner.depth`` plans in flight, one per pipeline stage, so with ``pp_size`` stages every stage has a
micro-batch to work on; the scheduler never puts a request in two in-flight plans. Callers on an
asyncio loop receive outputs through per-request queues; ``abort`` (a cancelled call, an expired
deadline) frees the request's KV blocks at the next loop turn.

A runner failure (a dead stage actor) fails every unfinished request with ``EngineDeadError`` and
marks the driver unhealthy; nothing waits forever.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator

from pipeline.engine import Engine, RequestOutput
from pipeline.request import NewRequest


class EngineDeadError(RuntimeError):
    """The runner failed; this replica cannot serve until it is replaced."""


class QueueFullError(RuntimeError):
    """Too many unfinished requests; try again later or elsewhere."""


class StalledStreamError(RuntimeError):
    """The caller stopped taking a request's tokens; the request was aborted and its blocks freed."""


class _Stream:
    """One request's outputs on their way from the driver thread to the caller's event loop.

    The driver appends under its lock; the caller takes everything buffered when it wakes, so a caller
    that keeps up gets each step's token at once and one that falls behind gets fewer, larger batches.
    ``has_items`` is set (on the caller's loop) only when the buffer goes from empty to not empty."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: list[RequestOutput | BaseException] = []
        self.num_buffered_tokens = 0
        self.has_items = asyncio.Event()

    def append(self, item: RequestOutput | BaseException) -> bool:
        """Buffer an item (the driver's lock held); True if the caller must be woken."""
        self.items.append(item)
        if isinstance(item, RequestOutput):
            self.num_buffered_tokens += len(item.new_token_ids)
        return len(self.items) == 1

    def take(self) -> list[RequestOutput | BaseException]:
        """Everything buffered (the driver's lock held)."""
        items, self.items = self.items, []
        self.num_buffered_tokens = 0
        self.has_items.clear()  # a wake already scheduled for these items finds nothing: harmless
        return items


def _wake(streams: list[_Stream]) -> None:
    for stream in streams:
        stream.has_items.set()


def merged(outputs: list[RequestOutput]) -> RequestOutput:
    """Consecutive outputs of one request as one: every new token, the last one's count, finish and
    metrics."""
    if len(outputs) == 1:
        return outputs[0]
    token_ids = tuple(t for out in outputs for t in out.new_token_ids)
    return dataclasses.replace(outputs[-1], new_token_ids=token_ids)


class EngineDriver:
    def __init__(
        self,
        engine: Engine,
        max_queued_requests: int = 1024,
        max_buffered_tokens: int = 1024,
        min_stream_interval_s: float = 0.0,
    ) -> None:
        """``max_buffered_tokens``: tokens of one request its caller may leave untaken; beyond them the
        request is aborted (``StalledStreamError``). ``min_stream_interval_s``: least time between two
        batches of one request after its first token (0: each batch goes out when the caller wakes)."""
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self.max_buffered_tokens = max_buffered_tokens
        self.min_stream_interval_s = min_stream_interval_s
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._adds: list[tuple[NewRequest, _Stream]] = []
        self._aborts: list[tuple[str, _Stream]] = []
        self._streams: dict[str, _Stream] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine-driver", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def is_stopped(self) -> bool:
        return self._stopping

    @property
    def is_healthy(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    @property
    def num_unfinished(self) -> int:
        with self._lock:
            return len(self._streams) + len(self._adds)

    def outstanding_predicted_tokens(self) -> int:
        """Predicted output tokens still to generate across this replica (an autoscaling signal)."""
        return sum(r.predicted_remaining_tokens for r in list(self.engine.scheduler.requests.values()))

    def expected_work_tokens(self) -> list[int]:
        """Each unfinished request's tokens still to compute by the predictions: queued prefill plus the
        output still to generate, its mean under the request's length distribution given the tokens so far
        (``Request.expected_work_tokens``; the point's countdown without one). What the length-aware
        replica router weighs. Read from another thread: a snapshot, possibly one step old."""
        return [round(r.expected_work_tokens) for r in list(self.engine.scheduler.requests.values())]

    # ---- callers (any asyncio loop) -------------------------------------------------------------

    async def generate(self, new: NewRequest) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; the last has ``finish_reason`` set. Each output carries every token
        produced since the previous one (one per step while the caller keeps up). Cancelling the
        iteration (or breaking out of it) aborts the request and frees its blocks."""
        if self.num_unfinished >= self.max_queued_requests:
            raise QueueFullError(f"queue is full: {self.max_queued_requests} unfinished requests")
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            if self.error is not None:  # checked under the lock: _fail_all fails every add made before
                raise EngineDeadError(f"engine is unhealthy: {self.error}")
            self._adds.append((new, stream))
        self._wake.set()
        # The driver thread owns the engine and validates there: a ValueError arrives as the first item.
        finished = False
        try:
            while True:
                await stream.has_items.wait()
                with self._lock:
                    items = stream.take()
                outputs = [item for item in items if isinstance(item, RequestOutput)]
                if outputs:
                    output = merged(outputs)
                    finished = output.finish_reason is not None
                    sent_s = time.monotonic()
                    yield output
                    if finished:
                        return
                if len(outputs) < len(items):
                    finished = True  # refused, stalled or the engine died: nothing left to abort
                    raise items[-1]
                if self.min_stream_interval_s > 0 and outputs:  # tokens buffer meanwhile
                    await asyncio.sleep(sent_s + self.min_stream_interval_s - time.monotonic())
        finally:
            if not finished:
                self._abort(new.request_id, stream)

    def _abort(self, request_id: str, stream: _Stream) -> None:
        # The stream identifies the call: a refused duplicate's abort must not stop the original request.
        with self._lock:
            self._aborts.append((request_id, stream))
        self._wake.set()

    # ---- the loop (driver thread) ---------------------------------------------------------------

    def _drain_intake(self) -> None:
        with self._lock:
            adds, self._adds = self._adds, []
            aborts, self._aborts = self._aborts, []
        for new, stream in adds:
            try:
                self.engine.add_request(new)  # validates, duplicate ids included
            except ValueError as exc:
                self._deliver(stream, exc)
                continue
            with self._lock:
                self._streams[new.request_id] = stream
        for request_id, stream in aborts:
            with self._lock:
                is_registered = self._streams.get(request_id) is stream
                if is_registered:
                    del self._streams[request_id]
            if is_registered:
                self.engine.abort(request_id)

    def _deliver(self, stream: _Stream, item: RequestOutput | BaseException) -> None:
        with self._lock:
            wake = stream.append(item)
        if wake:
            stream.loop.call_soon_threadsafe(_wake, [stream])

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """Buffer a step's outputs and wake their callers: one wake-up call per event loop, not per token."""
        to_wake: dict[asyncio.AbstractEventLoop, list[_Stream]] = {}
        stalled: list[str] = []
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                if out.finish_reason is not None:
                    del self._streams[out.request_id]
                elif stream.num_buffered_tokens >= self.max_buffered_tokens:
                    # The caller stopped reading: abort rather than buffer (and compute) without bound.
                    del self._streams[out.request_id]
                    stalled.append(out.request_id)
                    out = StalledStreamError(
                        f"request {out.request_id!r}: its caller left {stream.num_buffered_tokens} tokens "
                        f"untaken (max_buffered_tokens {self.max_buffered_tokens}); aborted"
                    )
                if stream.append(out):
                    to_wake.setdefault(stream.loop, []).append(stream)
        for request_id in stalled:
            self.engine.abort(request_id)
        for loop, streams in to_wake.items():
            loop.call_soon_threadsafe(_wake, streams)

    def _loop(self) -> None:
        try:
            while not self._stopping:
                self._drain_intake()
                outputs = self.engine.advance()
                if outputs is None:
                    # Idle, or a dynamic batch waiting for its timeout: sleep until new work or 1 ms.
                    self._wake.wait(timeout=0.001 if self.engine.has_unfinished else 0.1)
                    self._wake.clear()
                    continue
                # The next plan goes to the runner before this step's callers wake: their streaming (on the
                # replica's event loop, under the same interpreter lock) then overlaps the runner's next
                # step instead of delaying its start. New requests and aborts are taken first, as before.
                self._drain_intake()
                self.engine.fill()
                self._dispatch(outputs)
        except BaseException as exc:  # noqa: BLE001 (any runner failure kills this replica)
            self.error = exc
            self._fail_all(EngineDeadError(f"engine failed: {type(exc).__name__}: {exc}"))

    def _fail_all(self, error: EngineDeadError) -> None:
        with self._lock:
            streams, self._streams = self._streams, {}
            adds, self._adds = self._adds, []
        for request_id, stream in streams.items():
            self.engine.abort(request_id)
            self._deliver(stream, error)
        for _, stream in adds:
            self._deliver(stream, error)
