"""A Python client for ``binserve.v1.Generation``, on the generated stubs and ``grpc.aio``.

    async with GenerationClient("127.0.0.1:9000") as client:
        reply = await client.generate(make_request("Hello", max_tokens=16))
        async for message in client.generate_stream(make_request("Hello", max_tokens=16)):
            print(message.text, end="")
        timed = await client.generate_timed(make_request("Hello"), stream=True)   # with client-side TBT

From the shell: ``binserve client generate --address 127.0.0.1:9000 --prompt Hello [--stream] [--json]``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from pipeline.sampling import FIELD_NAMES
from proto.binserve.v1 import generation_pb2 as pb
from proto.binserve.v1 import generation_pb2_grpc as pb_grpc

FINISH_REASON_NAMES = {
    pb.FINISH_REASON_UNSPECIFIED: "",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}


def make_request(
    prompt: str = "",
    *,
    messages: Sequence[tuple[str, str]] = (),
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
    request_id: str = "",
    **sampling: float | int | None,
) -> pb.GenerateRequest:
    """A request proto: a ``prompt``, or ``messages`` as (role, content) pairs, and any of the sampling fields
    (``pipeline.sampling.FIELD_NAMES``: ``max_tokens``, ``temperature``, ...). ``None`` leaves an optional field
    unset: the deployment's serving default (``ModelInfo.sampling_defaults``)."""
    unknown = sorted(set(sampling) - set(FIELD_NAMES))
    if unknown:
        raise TypeError(
            f"make_request: no sampling field {', '.join(unknown)}; the fields: {', '.join(FIELD_NAMES)}"
        )
    request = pb.GenerateRequest(
        prompt=prompt,
        messages=[pb.ChatMessage(role=role, content=content) for role, content in messages],
        stop=list(stop),
        ignore_eos=ignore_eos,
        request_id=request_id,
    )
    for name, value in sampling.items():
        if value is not None:
            setattr(request, name, value)
    return request


@dataclass(frozen=True)
class TimedResponse:
    """A whole response (stream messages merged) and when the client saw its tokens arrive."""

    response: pb.GenerateResponse
    """The last message, with the whole text and every token id."""
    start_s: float
    token_times_s: tuple[float, ...]
    """``time.perf_counter()`` when each token arrived (a streamed message's tokens share its time)."""
    end_s: float

    @property
    def ttft_s(self) -> float | None:
        return self.token_times_s[0] - self.start_s if self.token_times_s else None

    @property
    def tbt_s(self) -> tuple[float, ...]:
        times = self.token_times_s
        return tuple(b - a for a, b in zip(times, times[1:], strict=False))

    @property
    def latency_s(self) -> float:
        return self.end_s - self.start_s


class GenerationClient:
    def __init__(self, address: str, application: str | None = None, api_key: str | None = None) -> None:
        """``address`` is ``HOST:PORT`` of Serve's gRPC proxy; ``application`` picks the Serve application
        when the cluster runs several (Serve's ``application`` metadata); ``api_key`` is sent as
        ``authorization: Bearer <key>`` when the deployment requires one."""
        self.address = address
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = pb_grpc.GenerationStub(self.channel)
        metadata = [("application", application)] if application else []
        if api_key:
            metadata.append(("authorization", f"Bearer {api_key}"))
        self.metadata = tuple(metadata) or None

    async def __aenter__(self) -> GenerationClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Wait until the channel connects (the proxy is up); ``TimeoutError`` after ``timeout_s``."""
        await asyncio.wait_for(self.channel.channel_ready(), timeout=timeout_s)

    async def generate(
        self, request: pb.GenerateRequest, timeout_s: float | None = None
    ) -> pb.GenerateResponse:
        return await self.stub.Generate(request, timeout=timeout_s, metadata=self.metadata)

    def generate_stream(
        self, request: pb.GenerateRequest, timeout_s: float | None = None
    ) -> grpc.aio.UnaryStreamCall:
        """An async iterator of messages; ``.cancel()`` on it cancels the call (and frees its KV blocks)."""
        return self.stub.GenerateStream(request, timeout=timeout_s, metadata=self.metadata)

    async def model_info(self, timeout_s: float | None = None) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=timeout_s, metadata=self.metadata)

    async def generate_timed(
        self, request: pb.GenerateRequest, stream: bool, timeout_s: float | None = None
    ) -> TimedResponse:
        """One call, unary or streaming, timed at the client. A unary reply's tokens all arrive at once."""
        start_s = time.perf_counter()
        if not stream:
            response = await self.generate(request, timeout_s)
            end_s = time.perf_counter()
            return TimedResponse(response, start_s, (end_s,) * len(response.token_ids), end_s)
        token_times_s: list[float] = []
        text: list[str] = []
        token_ids: list[int] = []
        async for message in self.generate_stream(request, timeout_s):
            token_times_s += [time.perf_counter()] * len(message.token_ids)
            text.append(message.text)
            token_ids.extend(message.token_ids)
        message.text = "".join(text)
        del message.token_ids[:]
        message.token_ids.extend(token_ids)
        return TimedResponse(message, start_s, tuple(token_times_s), time.perf_counter())
