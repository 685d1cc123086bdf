"""The OpenAI-compatible HTTP API, served by the ingress deployment next to its gRPC methods.

    POST /v1/chat/completions   POST /v1/completions   (JSON, or an SSE stream ending in ``data: [DONE]``)
    GET  /v1/models             GET  /v1/models/{model}             GET /health

Every route runs the shared path (``cluster/generation.py``): the same checks, the length predictor, the
binning router and the engine pools as gRPC, so HTTP callers get SSJF, bins and SARATHI too. Errors are
OpenAI's JSON body ``{"error": {"message", "type", "param", "code"}}``: 400 naming the field and its
range, 401 a missing or wrong API key, 404 an unknown model, 429 a full queue, 503 a dead engine.

A request's outcome is known before any byte is sent: the first chunk is awaited before the response
starts, so a full queue is a 429, not a broken stream. A client that disconnects makes Serve cancel the
call; the cancellation reaches ``GenerationService.generate``, which aborts the engine request.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from cluster.auth import ApiKey
from cluster.errors import ErrorKind, Unauthenticated, UnknownModel, classify, field_of, status_name
from cluster.generation import GenerationChunk, GenerationService
from cluster.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Kind,
    completion,
    stream_chunk,
    usage_chunk,
)
from cluster.prometheus import IngressMetrics

logger = logging.getLogger("ray.serve")
_HTTP_STATUS = {
    ErrorKind.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    ErrorKind.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    ErrorKind.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    ErrorKind.QUEUE_FULL: (429, "rate_limit_error", "queue_full"),
    ErrorKind.UNAVAILABLE: (503, "server_error", "engine_unavailable"),
}


def error_body(message: str, kind: ErrorKind | None) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI's error body; ``kind`` ``None`` is a bug (500)."""
    status, error_type, code = _HTTP_STATUS.get(kind, (500, "server_error", "internal_error"))
    param = field_of(message) if kind is ErrorKind.INVALID_ARGUMENT else None
    return status, {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(exc: BaseException) -> JSONResponse:
    kind, message = classify(exc) or (None, f"internal error: {type(exc).__name__}")
    status, body = error_body(message, kind)
    return JSONResponse(body, status_code=status)


def build_openai_app(
    service: GenerationService,
    model_id: str,
    api_key: ApiKey,
    max_model_len: int,
    metrics: IngressMetrics | None = None,
) -> FastAPI:
    app = FastAPI(title="binserve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    def check_model(model: str | None) -> None:
        if model is not None and model != model_id:
            raise UnknownModel(f"model: {model!r} is not served here; the model is {model_id!r}")

    def model_card() -> dict[str, Any]:
        return {
            "id": model_id,
            "object": "model",
            "created": created,
            "owned_by": "binserve",
            "max_model_len": max_model_len,
        }

    @app.exception_handler(RequestValidationError)
    async def on_invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
        return error_response(ValueError(f"{where}: {first['msg']}"))

    @app.exception_handler(HTTPException)
    async def on_http_error(_: Request, exc: HTTPException) -> JSONResponse:
        error = {"message": str(exc.detail), "type": "invalid_request_error", "param": None, "code": None}
        return JSONResponse({"error": error}, status_code=exc.status_code)

    if api_key.is_required:
        app.add_middleware(_RequireKey, api_key=api_key, on_refused=lambda exc: observe(exc, None))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        try:
            check_model(model)
        except UnknownModel as exc:
            return error_response(exc)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        return await respond("chat", body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return await respond("text", body)

    def observe(failure: BaseException | None, bin_id: int | None) -> None:
        if metrics is not None:
            metrics.observe_request("http", status_name(failure), bin_id)

    async def respond(kind: Kind, body: ChatCompletionRequest | CompletionRequest):
        # Every failure is answered here: Serve installs its own handlers (503) for some of them.
        try:
            check_model(body.model)
            chunks = service.generate(body.to_input())
            first = await anext(chunks)
            if not body.stream:
                async with aclosing(chunks):
                    collected = [first] + [c async for c in chunks]
                observe(None, first.routing.bin_id)
                return completion(kind, model_id, collected)
        except BaseException as exc:
            observe(exc, None)
            if not isinstance(exc, Exception):
                raise  # a disconnect (cancellation) has nobody to answer
            if classify(exc) is None:
                logger.exception("request failed")
            return error_response(exc)
        render = _sse_renderer(kind, model_id, body.include_usage)
        return StreamingResponse(_events(first, chunks, render, observe), media_type="text/event-stream")

    return app


class _RequireKey:
    """Pure ASGI middleware (it must not buffer streams or swallow disconnects): checks the key of every
    ``/v1/`` request before its body is read, so a caller without the key learns nothing about the API."""

    def __init__(self, app, api_key: ApiKey, on_refused: Callable[[Unauthenticated], None]) -> None:
        self.app = app
        self.api_key = api_key
        self.on_refused = on_refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            authorization = dict(scope["headers"]).get(b"authorization")
            try:
                self.api_key.check(None if authorization is None else authorization.decode("latin-1"))
            except Unauthenticated as exc:
                self.on_refused(exc)
                await error_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _sse_renderer(kind: Kind, model_id: str, include_usage: bool) -> Callable[[GenerationChunk, bool], str]:
    created = int(time.time())

    def render(chunk: GenerationChunk, is_first: bool) -> str:
        events = [stream_chunk(kind, model_id, chunk, created, is_first, include_usage)]
        if chunk.final is not None and include_usage:
            events.append(usage_chunk(kind, model_id, chunk, created))
        return "".join(_sse(e) for e in events)

    return render


async def _events(
    first: GenerationChunk,
    chunks: AsyncIterator[GenerationChunk],
    render: Callable[[GenerationChunk, bool], str],
    observe: Callable[[BaseException | None, int | None], None],
) -> AsyncIterator[str]:
    failure: BaseException | None = None
    try:
        yield render(first, True)
        async for chunk in chunks:
            # Pieces held back for a stop string carry no text: nothing to send until they settle.
            if chunk.text or chunk.finish_reason is not None:
                yield render(chunk, False)
        yield "data: [DONE]\n\n"
    except Exception as exc:  # the engine died mid-stream: the status is sent already, say it in-band
        failure = exc
        _, body = error_body(*_described(exc))
        yield _sse(body)
    except BaseException as exc:  # a disconnect
        failure = exc
        raise
    finally:
        observe(failure, first.routing.bin_id)
        await chunks.aclose()  # a disconnect: abort the engine request now, not when collected


def _described(exc: BaseException) -> tuple[str, ErrorKind | None]:
    kind, message = classify(exc) or (None, f"internal error: {type(exc).__name__}")
    return message, kind


def _sse(event: dict[str, Any]) -> str:
    return f"data: {json.dumps(event, ensure_ascii=False, separators=(',', ':'))}\n\n"
