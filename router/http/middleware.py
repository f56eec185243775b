"""Pure ASGI middleware (no BaseHTTPMiddleware: it copies bodies): request ids, body limit, metrics."""

from __future__ import annotations

import logging
import re
import secrets
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ApiError, internal_error
from ..metrics import Metrics
from .responses import error_response

log = logging.getLogger("imagegate")

_SANE_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")


class GatewayMiddleware:
    """Echo or assign `x-request-id`, refuse bodies over the limit (413), and time every request."""

    def __init__(self, app: ASGIApp, *, max_body: int, metrics: Metrics | None) -> None:
        self.app, self.max_body, self.metrics = app, max_body, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        incoming = dict(scope["headers"]).get(b"x-request-id", b"")
        request_id = incoming if _SANE_ID.match(incoming) else f"req_{secrets.token_hex(12)}".encode()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id.decode()
        status, response_started = 500, False
        path: str = scope["path"]
        private = path == "/v1/usage" or path.startswith("/admin/")

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                extra = [(b"x-request-id", request_id)]
                if private:  # a balance or a key list must not sit in a cache
                    extra.append((b"cache-control", b"no-store"))
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        declared = dict(scope["headers"]).get(b"content-length", b"")
        try:
            if declared.isdigit() and int(declared) > self.max_body:
                await error_response(_too_large(self.max_body), scope["path"])(scope, receive, send_with_id)
            else:
                await self.app(scope, self._limited(receive), send_with_id)
        except Exception:
            # Last resort: log the trace, answer an OpenAI-shaped 500 that carries the request id.
            log.exception("unhandled error (request %s)", state["request_id"])
            if not response_started:
                await error_response(internal_error(), scope["path"])(scope, receive, send_with_id)
        if self.metrics is not None:
            endpoint = state.get("endpoint")
            if endpoint:
                self.metrics.observe(endpoint, state.get("model", "none"), status, time.perf_counter() - started)

    def _limited(self, receive: Receive) -> Receive:
        seen = 0

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _too_large(self.max_body)
            return message

        return wrapped


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than {limit // (1024 * 1024)} MB", code="request_too_large")
