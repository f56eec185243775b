"""API keys: with `auth.enabled`, every call to `/v1` and to the native endpoints under `/v2`
(`/v2/image/…`, `/v2/tasks/…`) needs `Authorization: Bearer ig_…`, and every call to the
AUTOMATIC1111 surface the same, or HTTP Basic with the key as the password (A1111's `--api-auth`;
the user name is not read).

A pure ASGI middleware (inside GatewayMiddleware, so refusals carry the request id). The key it
finds is left in `request.state.api_key`, where `context.caller_of` reads it: the model check
(403) happens where the model is known, in the pipeline, and billing reads the same record.
"""

from __future__ import annotations

import base64
import binascii
import re
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import ApiError
from ..pipeline import KeyRecord
from ..services import Services
from .a1111_errors import speaks_a1111
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
                    await error_response(exc, scope["path"])(scope, receive, send)
                    return
                scope.setdefault("state", {})["api_key"] = key
        await self.app(scope, receive, send)


def _guarded(scope: Scope) -> bool:
    path: str = scope["path"]
    if speaks_a1111(path):
        return True
    if path.startswith("/v2/"):
        return True  # the native family endpoints and their tasks
    if not (path == "/v1" or path.startswith("/v1/")):
        return False  # /healthz, /readyz, /metrics and /admin have their own rules
    return not (_SIGNED_ARTIFACT.match(path) and signed(scope.get("query_string", b"")))


def signed(query_string: bytes) -> bool:
    """Whether the query carries a signature to check (its handler checks it): both real
    parameters, not a substring that merely looks like one."""
    params = parse_qs(query_string.decode("latin-1"), keep_blank_values=True)
    return "expires" in params and "signature" in params


def _secret(scope: Scope) -> str | None:
    """The key a request carries: a bearer token, or (A1111 surface) a Basic password."""
    header: str = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if scheme.lower() == "basic" and speaks_a1111(scope["path"]):
        try:
            _, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return password or None
    return None


async def _authenticate(services: Services, scope: Scope) -> KeyRecord:
    secret = _secret(scope)
    if secret is None:
        raise _unauthorized(scope, "no API key: send `Authorization: Bearer <key>`")
    key = await services.accounts.authenticate(secret)
    if key is None:
        # One message for unknown, malformed and revoked keys: which one it was is not the caller's business.
        raise _unauthorized(scope, "incorrect or revoked API key")
    return key


def _unauthorized(scope: Scope, message: str) -> ApiError:
    if speaks_a1111(scope["path"]):
        return ApiError(401, message + " (or HTTP Basic with the key as the password)", code="invalid_api_key",
                        headers={"www-authenticate": 'Basic realm="imagegate"'})
    return ApiError(401, message, code="invalid_api_key", headers={"www-authenticate": "Bearer"})
