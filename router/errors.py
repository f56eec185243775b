"""The gateway's one error type. Every layer raises `ApiError`; each HTTP surface renders it in
its own shape (the OpenAI one, `{"error": {"message", "type", "param", "code"}}`, is `body()`),
never with a stack trace."""

from __future__ import annotations

import orjson

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


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def internal_error() -> ApiError:
    return ApiError(500, "internal error; the x-request-id header identifies it in the server log",
                    code="internal_error")
