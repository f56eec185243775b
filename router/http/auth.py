"""API keys on `/v1`: with `auth.enabled`, every call there needs `Authorization: Bearer ig_…`.

A pure ASGI middleware (inside GatewayMiddleware, so refusals carry the request id). The key it
finds is left in `request.state.api_key`, where `context.caller_of` reads it: the model check
(403) happens where the model is known, in the pipeline, and billing reads the same record.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import ApiError
from ..pipeline import KeyRecord
from ..services import Services
from .responses import error_response

# A signed artifact URL is its own credential (HMAC, expiring): it is meant to work without a key.
_SIGNED_ARTIFACT = re.compile(r"^/v1/artifacts/[^/]+/content$")


class AuthMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _guarded(scope):
            services: Services = scope["app"].state.gateway
            if services.cfg.auth.enabled:
                try:
                    key = await _authenticate(services, scope)
                except ApiError as exc:
                    await error_response(exc)(scope, receive, send)
                    return
                scope.setdefault("state", {})["api_key"] = key
        await self.app(scope, receive, send)


def _guarded(scope: Scope) -> bool:
    path: str = scope["path"]
    if not (path == "/v1" or path.startswith("/v1/")):
        return False  # /healthz, /readyz, /metrics and /admin have their own rules
    return not (_SIGNED_ARTIFACT.match(path) and signed(scope.get("query_string", b"")))


def signed(query_string: bytes) -> bool:
    """Whether the query carries a signature to check (its handler checks it): both real
    parameters, not a substring that merely looks like one."""
    params = parse_qs(query_string.decode("latin-1"), keep_blank_values=True)
    return "expires" in params and "signature" in params


async def _authenticate(services: Services, scope: Scope) -> KeyRecord:
    header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise _unauthorized("no API key: send `Authorization: Bearer <key>`")
    key = await services.accounts.authenticate(secret.strip())
    if key is None:
        # One message for unknown, malformed and revoked keys: which one it was is not the caller's business.
        raise _unauthorized("incorrect or revoked API key")
    return key


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key", headers={"www-authenticate": "Bearer"})
