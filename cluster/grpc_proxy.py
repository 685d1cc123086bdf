"""What Serve's gRPC proxy registers for binserve, plus a fix for a lost stream cancellation.

Serve config: ``grpc_options.grpc_servicer_functions`` lists the generated
``add_GenerationServicer_to_server`` and ``cluster.grpc_proxy.install``. The proxy process imports and
calls each once at start-up (with a placeholder servicer and its server), which makes ``install`` the
place to adjust the proxy; it registers no service.

The fix (Ray Serve 2.60): the proxy streams a replica's messages from an async generator
(``gRPCProxy.send_request_to_replica``) that yields each message to gRPC. When the client cancels a
stream while the proxy is suspended in that ``yield`` (handing a message over), the generator is closed
with ``GeneratorExit`` there, not cancelled in its ``await`` on the replica, and the
``ProxyResponseGenerator`` that would have cancelled the replica call is simply dropped: the request then
runs to its end before its KV blocks are freed (measured: 2 of 30 cancelled streams). Dropped without
having finished, it now cancels the replica call, which aborts the request in the engine at once.
"""

from __future__ import annotations

from typing import Any

INSTALL_FUNCTION = "cluster.grpc_proxy.install"
"""What ``grpc_options.grpc_servicer_functions`` must list besides the generated servicer function."""


def install(servicer: Any, server: Any) -> None:
    """Called by Serve's gRPC proxy at start-up; registers no service."""
    cancel_abandoned_replica_calls()


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
