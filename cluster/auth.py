"""The optional API key, checked at the ingress for both APIs before a request costs anything.

    key = ApiKey.of(config.ingress)           # from the YAML, else BINSERVE_API_KEY, else none
    key.check(authorization_header)           # raises Unauthenticated unless "Bearer <key>"

gRPC callers send it as ``authorization`` metadata, HTTP callers as the ``Authorization`` header (what
the ``openai`` client sends for ``api_key``). Calls through a Serve handle inside the cluster carry no
gRPC context and are trusted: they come from code already running in the cluster.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass

from cluster.config import IngressConfig
from cluster.errors import Unauthenticated

API_KEY_ENV = "BINSERVE_API_KEY"


@dataclass(frozen=True)
class ApiKey:
    key: str | None
    """``None``: no key is needed."""

    @classmethod
    def of(cls, config: IngressConfig) -> ApiKey:
        return cls(config.api_key or os.environ.get(API_KEY_ENV, "").strip() or None)

    @property
    def is_required(self) -> bool:
        return self.key is not None

    def check(self, authorization: str | None) -> None:
        if self.key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        # Constant-time comparison: the time taken says nothing about how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key.encode()):
            raise Unauthenticated(
                "authorization: a valid API key is required (`authorization: Bearer <key>`)"
            )
