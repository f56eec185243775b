"""The Starlette application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Route

from . import api, images
from .config import Config
from .errors import ApiError, api_error_handler, http_error_handler
from .gateway import Gateway
from .middleware import GatewayMiddleware


def create_app(cfg: Config) -> Starlette:
    gateway = Gateway(cfg)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    routes = [
        Route("/v1/images/generations", images.generations, methods=["POST"]),
        Route("/v1/images/edits", images.edits, methods=["POST"]),
        Route("/v1/models", api.list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", api.get_model, methods=["GET"]),
        Route("/v1/uploads", api.upload, methods=["POST"]),
        Route("/v1/artifacts/{artifact_id}/content", api.artifact_content, methods=["GET"]),
        Route("/healthz", api.healthz, methods=["GET"]),
        Route("/readyz", api.readyz, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
    ]
    max_body = int(cfg.server.max_body_mb * 1024 * 1024)
    metrics = gateway.metrics if cfg.metrics.enabled else None
    app = Starlette(
        routes=routes,
        middleware=[Middleware(GatewayMiddleware, max_body=max_body, metrics=metrics)],
        exception_handlers={ApiError: api_error_handler, HTTPException: http_error_handler},
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app
