"""What Serve's gRPC proxy registers for binserve: load shedding at the edge, a fix for a lost stream
cancellation, and UNAVAILABLE (not INTERNAL) for calls whose ingress replica is lost.

Serve config: ``grpc_options.grpc_servicer_functions`` lists ``cluster.grpc_proxy.install`` and then the
generated ``add_GenerationServicer_to_server``. The proxy process imports and calls each once at
start-up (with a placeholder servicer and its server), which makes ``install`` the place to adjust the
proxy; it registers no service. Listed first, it wraps the handlers of the services registered after it.

Load shedding (``ShedGate``): a refused call used to cost the proxy its whole request path (request
context, routing, a handle call to the ingress, metrics, access log: 4-10 ms of CPU each on 2 loaded
cores), so a burst of thousands of calls waited seconds in the proxy only to be refused by the ingress.
The gate counts the proxy's binserve calls in flight; when the ingress refuses one (RESOURCE_EXHAUSTED:
its admission bound), the count at that moment becomes the gate's limit, and calls beyond it are refused
in the handler at once (microseconds), with the same code. The limit lapses ``hold_s`` after the last
refusal from the ingress, so added capacity is found again; nothing is configured twice.

The fix (Ray Serve 2.60): the proxy streams a replica's messages from an async generator
(``gRPCProxy.send_request_to_replica``) that yields each message to gRPC. When the client cancels a
stream while the proxy is suspended in that ``yield`` (handing a message over), the generator is closed
with ``GeneratorExit`` there, not cancelled in its ``await`` on the replica, and the
``ProxyResponseGenerator`` that would have cancelled the replica call is simply dropped: the request then
runs to its end before its KV blocks are freed (measured: 2 of 30 cancelled streams). Dropped without
having finished, it now cancels the replica call, which aborts the request in the engine at once.

Lost ingress replicas (Ray Serve 2.60): when the ingress replica of a call dies (its process, or the node
it ran on), the proxy's handle call raises ``RayActorError`` and Serve answers INTERNAL, a code clients
treat as a bug and do not retry. It is now UNAVAILABLE, like a lost engine replica behind the ingress
(``cluster/errors.py``); the proxy routes the retry to a live ingress replica.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from cluster.errors import LOST_REPLICA_ERRORS

INSTALL_FUNCTION = "cluster.grpc_proxy.install"
"""What ``grpc_options.grpc_servicer_functions`` must list besides the generated servicer function."""


GATED_METHOD_PREFIX = "/binserve.v1.Generation/Generate"
"""Generate and GenerateStream: the calls that queue for the engines."""


class ShedGate:
    def __init__(self, hold_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.hold_s = hold_s
        self.clock = clock
        self.in_flight = 0
        self.limit: int | None = None
        """Calls in flight when the ingress last refused one; None: no recent refusal."""
        self.refused_at = 0.0
        self.num_shed = 0

    def try_enter(self) -> bool:
        """Whether a new call goes on to the ingress (then ``leave`` must follow) or is refused here."""
        if self.limit is not None and self.in_flight >= self.limit:
            if self.clock() - self.refused_at < self.hold_s:
                self.num_shed += 1
                return False
            self.limit = None  # no refusal for a while: find the ingress's bound again
        self.in_flight += 1
        return True

    def leave(self, refused_downstream: bool) -> None:
        if refused_downstream:
            self.limit, self.refused_at = self.in_flight, self.clock()
        self.in_flight -= 1


SHED_MESSAGE = "proxy: the ingress is refusing calls beyond its admission bound; retry later"


def _code_of(context: Any) -> Any:
    code = getattr(context, "code", None)
    return code() if callable(code) else None


def gate_handlers(factory: Callable, gate: ShedGate) -> Callable:
    """Wrap Serve's ``service_handler_factory``: binserve's generation methods pass ``gate`` first."""

    def gated_factory(service_method: str, streaming_type: Any) -> Callable:
        handler = factory(service_method=service_method, streaming_type=streaming_type)
        if not service_method.startswith(GATED_METHOD_PREFIX):
            return handler
        if getattr(streaming_type, "name", "") == "UNARY_STREAM":

            async def unary_stream(request: Any, context: Any) -> AsyncIterator[bytes]:
                if not gate.try_enter():
                    context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
                    context.set_details(SHED_MESSAGE)
                    return
                refused = False
                try:
                    async for message in handler(request, context):
                        yield message
                    refused = _code_of(context) is grpc.StatusCode.RESOURCE_EXHAUSTED
                finally:
                    gate.leave(refused)

            return unary_stream

        async def unary(request: Any, context: Any) -> Any:
            if not gate.try_enter():
                context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
                context.set_details(SHED_MESSAGE)
                return b""
            refused = False
            try:
                response = await handler(request, context)
                refused = _code_of(context) is grpc.StatusCode.RESOURCE_EXHAUSTED
                return response
            finally:
                gate.leave(refused)

        return unary

    return gated_factory


def install(servicer: Any, server: Any) -> None:
    """Called by Serve's gRPC proxy at start-up; registers no service."""
    cancel_abandoned_replica_calls()
    report_lost_ingress_as_unavailable()
    factory = getattr(server, "service_handler_factory", None)
    if factory is not None and not getattr(server, "_binserve_gated", False):
        server.service_handler_factory = gate_handlers(factory, ShedGate())
        server._binserve_gated = True


def cancel_abandoned_replica_calls() -> None:
    """Make a ``ProxyResponseGenerator`` dropped before its last message cancel its replica call."""
    from ray.serve._private.proxy_response_generator import ProxyResponseGenerator

    if getattr(ProxyResponseGenerator, "_binserve_cancels_when_dropped", False):
        return

    def __del__(self: ProxyResponseGenerator) -> None:  # noqa: N807
        response = getattr(self, "_response", None)
        if response is not None and not getattr(self, "_done", True) and not response.cancelled():
            response.cancel()

    ProxyResponseGenerator.__del__ = __del__
    ProxyResponseGenerator._binserve_cancels_when_dropped = True


LOST_INGRESS_MESSAGE = "proxy: the ingress replica serving this call was lost; retry ({})"


def report_lost_ingress_as_unavailable() -> None:
    """Make Serve's gRPC proxy answer UNAVAILABLE, not INTERNAL, when a call's ingress replica is lost."""
    from ray.serve._private import proxy
    from ray.serve._private.proxy_request_response import ResponseStatus

    serves_status = proxy.get_grpc_response_status
    if getattr(serves_status, "_binserve_lost_ingress", False):
        return

    def get_grpc_response_status(exc: BaseException, request_timeout_s: Any, request_id: str) -> Any:
        if isinstance(exc, LOST_REPLICA_ERRORS):
            message = LOST_INGRESS_MESSAGE.format(str(exc)[:300])
            return ResponseStatus(code=grpc.StatusCode.UNAVAILABLE, is_error=True, message=message)
        return serves_status(exc, request_timeout_s, request_id)

    get_grpc_response_status._binserve_lost_ingress = True
    proxy.get_grpc_response_status = get_grpc_response_status
