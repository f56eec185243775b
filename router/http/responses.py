"""Responses: JSON through orjson, errors in the OpenAI shape, and a pipeline `Reply` as sent."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..errors import ApiError
from ..pipeline import Reply
from .a1111_errors import a1111_error_response, speaks_a1111


class JSONResponse(Response):
    """orjson: response bodies carry megabytes of base64."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(exc: ApiError, path: str = "") -> Response:
    """The error in the shape of the surface `path` belongs to (OpenAI's unless another's)."""
    if speaks_a1111(path):
        return a1111_error_response(exc)
    return Response(exc.body(), status_code=exc.status, headers=exc.headers, media_type="application/json")


class PiecesResponse(Response):
    """A body written from the pieces it is made of (the images' base64 among them), not joined."""

    def __init__(self, pieces: tuple[bytes | memoryview, ...], status_code: int, headers: dict[str, str],
                 media_type: str) -> None:
        self.pieces = pieces
        length = sum(len(piece) for piece in pieces)
        super().__init__(None, status_code, {**headers, "content-length": str(length)}, media_type)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        last = len(self.pieces) - 1
        for index, piece in enumerate(self.pieces):
            await send({"type": "http.response.body", "body": piece, "more_body": index < last})


def reply_response(reply: Reply) -> Response:
    if reply.parts:
        return PiecesResponse(reply.parts, reply.status, reply.headers, reply.media_type)
    return Response(reply.body, status_code=reply.status, headers=reply.headers, media_type=reply.media_type)


async def api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc, request.url.path)


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    # Keep Starlette's headers: a 405 must say which methods are allowed (`Allow`).
    error = ApiError(exc.status_code, str(exc.detail), code=code, headers=dict(exc.headers or {}))
    return error_response(error, request.url.path)
