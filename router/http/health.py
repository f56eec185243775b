"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.responses import Response

from ..errors import ApiError
from .context import services
from .responses import JSONResponse


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    report = await services(request).readiness()
    return JSONResponse(report, status_code=200 if report["status"] == "ready" else 503)


def bearer_matches(request: Request, expected: str) -> bool:
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    return hmac.compare_digest(given.encode(), expected.encode())


async def metrics(request: Request) -> Response:
    found = services(request)
    if not found.cfg.metrics.enabled:
        raise ApiError(404, "metrics are disabled", code="not_found")
    token = found.cfg.metrics.token
    if token and not bearer_matches(request, token):
        raise ApiError(401, "metrics need the configured bearer token", code="invalid_token")
    found.observe_upstreams()
    data, content_type = found.metrics.render()
    return Response(data, media_type=content_type)
