"""API keys on `/v1`: with `auth.enabled`, every call there needs `Authorization: Bearer ig_…`.

A pure ASGI middleware (inside GatewayMiddleware, so refusals carry the request id). The key it
finds is left in `request.state.api_key` for the handlers: the model check (403) happens where the
model is known, in router/images.py, and billing will read the same record.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import ApiError
from .state import KeyRecord

# A signed artifact URL is its own credential (HMAC, expiring): it is meant to work without a key.
_SIGNED_ARTIFACT = re.compile(r"^/v1/artifacts/[^/]+/content$")


class AuthMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _guarded(scope):
            gateway = scope["app"].state.gateway
            if gateway.cfg.auth.enabled:
                try:
                    key = await _authenticate(gateway, scope)
                except ApiError as exc:
                    await exc.response()(scope, receive, send)
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


async def _authenticate(gateway: object, scope: Scope) -> KeyRecord:
    header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise _unauthorized("no API key: send `Authorization: Bearer <key>`")
    store = getattr(gateway, "store", None)
    if store is None:  # not started: cannot happen behind the lifespan, refuse rather than let through
        raise ApiError(503, "the state store is not open", code="state_unavailable", retry_after=1)
    key = await store.authenticate(secret.strip())
    if key is None:
        # One message for unknown, malformed and revoked keys: which one it was is not the caller's business.
        raise _unauthorized("incorrect or revoked API key")
    return key


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key", headers={"www-authenticate": "Bearer"})


def api_key(request: Request) -> KeyRecord | None:
    """The caller's key; None when auth is off."""
    return getattr(request.state, "api_key", None)


def owner_id(request: Request) -> str | None:
    """Who owns what this request makes or reads (tasks, artifacts): the key's id; None with auth off."""
    key = api_key(request)
    return key.id if key is not None else None


def check_model(request: Request, model_id: str) -> None:
    """403 when the caller's key has a model list and `model_id` is not on it."""
    key = api_key(request)
    if key is not None and not key.allows(model_id):
        raise ApiError(403, f"this API key may not use model '{model_id}'", param="model",
                       code="model_not_allowed")


def model_filter(request: Request) -> Callable[[str], bool]:
    key = api_key(request)
    return key.allows if key is not None else (lambda model_id: True)
