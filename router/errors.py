"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`, never a stack trace."""

from __future__ import annotations

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from imagegate.providers.base import UpstreamError

_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_quota",
    403: "permission_error", 404: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
    415: "invalid_request_error", 429: "rate_limit_error", 502: "upstream_error", 503: "service_unavailable",
    504: "timeout_error",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})
        if retry_after is not None and retry_after == retry_after:  # NaN says nothing
            self.headers["retry-after"] = str(max(1, int(min(retry_after, 86_400) + 0.999)))

    @classmethod
    def from_upstream(cls, exc: UpstreamError) -> ApiError:
        return cls(exc.status, exc.message, param=exc.param, code=exc.code, retry_after=exc.retry_after)

    def payload(self) -> dict[str, object]:
        """The `error` object (what a failed task keeps too)."""
        kind = _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"message": self.message, "type": kind, "param": self.param, "code": self.code}

    def body(self) -> bytes:
        return orjson.dumps({"error": self.payload()})

    def response(self) -> Response:
        return Response(self.body(), status_code=self.status, headers=self.headers, media_type="application/json")


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


async def api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    # Keep Starlette's headers: a 405 must say which methods are allowed (`Allow`).
    return ApiError(exc.status_code, str(exc.detail), code=code, headers=dict(exc.headers or {})).response()


def internal_error() -> ApiError:
    return ApiError(500, "internal error; the x-request-id header identifies it in the server log",
                    code="internal_error")
