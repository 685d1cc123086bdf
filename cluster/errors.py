"""What went wrong with a request, in words both APIs map to their own codes.

    kind, message = classify(exc)         # None: a bug (gRPC INTERNAL, HTTP 500)

| kind             | gRPC               | HTTP | raised by                                           |
|------------------|--------------------|------|-----------------------------------------------------|
| INVALID_ARGUMENT | INVALID_ARGUMENT   | 400  | any ``ValueError`` (ingress checks, engine checks)  |
| UNAUTHENTICATED  | UNAUTHENTICATED    | 401  | ``Unauthenticated`` (a missing or wrong API key)    |
| NOT_FOUND        | NOT_FOUND          | 404  | ``UnknownModel``                                    |
| QUEUE_FULL       | RESOURCE_EXHAUSTED | 429  | queue bounds (engine, Serve); a stalled stream      |
| UNAVAILABLE      | UNAVAILABLE        | 503  | a dead engine, replica, worker or node              |

A ``ValueError``'s message starts with the field it names (``top_p: must be in (0, 1], got 5``);
``field_of`` reads it back for OpenAI's ``param``.
"""

from __future__ import annotations

import asyncio
import enum
import re

import grpc
from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, RayTaskError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from pipeline.driver import EngineDeadError, QueueFullError, StalledStreamError


class ErrorKind(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    UNAUTHENTICATED = "unauthenticated"
    NOT_FOUND = "not_found"
    QUEUE_FULL = "queue_full"
    UNAVAILABLE = "unavailable"


class Unauthenticated(Exception):
    """The call carries no API key, or the wrong one."""


class UnknownModel(Exception):
    """The request names a model this deployment does not serve."""


LOST_REPLICA_ERRORS: tuple[type[BaseException], ...] = (
    RayActorError,
    NodeDiedError,
    WorkerCrashedError,
    ObjectLostError,
    DeploymentUnavailableError,
)
"""A replica lost with its process or its node: ``RayActorError`` (it died, or is unreachable: "Socket
closed"), or what a lost node takes with it (its workers, the objects it owned), or no replica left."""

_KINDS: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], ErrorKind], ...] = (
    (ValueError, ErrorKind.INVALID_ARGUMENT),
    (Unauthenticated, ErrorKind.UNAUTHENTICATED),
    (UnknownModel, ErrorKind.NOT_FOUND),
    ((QueueFullError, StalledStreamError, BackPressureError), ErrorKind.QUEUE_FULL),
    ((EngineDeadError, *LOST_REPLICA_ERRORS), ErrorKind.UNAVAILABLE),
)
_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


def classify(exc: BaseException) -> tuple[ErrorKind, str] | None:
    """The kind of a failure the caller can act on, with its message; ``None`` for a bug."""
    # An exception raised in another deployment arrives wrapped (its own type mixed in, or as ``cause``).
    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    for types, kind in _KINDS:
        if isinstance(cause, types):
            return kind, str(cause)
    return None


GRPC_STATUS = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.QUEUE_FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}


def status_name(exc: BaseException | None) -> str:
    """A call's outcome as a gRPC status name, for either API (the request counter's ``code`` tag)."""
    if exc is None:
        return "OK"
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    classified = classify(exc)
    return "INTERNAL" if classified is None else GRPC_STATUS[classified[0]].name


def field_of(message: str) -> str | None:
    """The field an error message names first (``messages[2].content``), or ``None``."""
    match = _FIELD.match(message)
    return match.group(1) if match else None
