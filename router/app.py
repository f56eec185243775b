"""The Starlette application."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Route

from . import admin, api, billing, images, tasks
from .auth import AuthMiddleware
from .config import Config, load
from .errors import ApiError, api_error_handler, http_error_handler
from .gateway import Gateway
from .metrics import Metrics
from .middleware import GatewayMiddleware


def create_app(cfg: Config) -> Starlette:
    gateway = Gateway(cfg)
    gateway.tasks = tasks.TaskRunner(gateway)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        await gateway.tasks.start()  # sweeps leases that lapsed while no replica was up
        _drain_on_sigterm(gateway)
        try:
            yield
        finally:
            await gateway.tasks.stop()  # tasks still running fail and refund, before the store closes
            await gateway.stop()
            Metrics.process_exit()

    routes = [
        Route("/v1/images/generations", images.generations, methods=["POST"]),
        Route("/v1/images/edits", images.edits, methods=["POST"]),
        Route("/v1/models", api.list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", api.get_model, methods=["GET"]),
        Route("/v1/usage", billing.usage, methods=["GET"]),
        Route("/v1/uploads", api.upload, methods=["POST"]),
        Route("/v1/tasks/{task_id}", tasks.get_task, methods=["GET"]),
        Route("/v1/tasks/{task_id}/cancel", tasks.cancel_task, methods=["POST"]),
        Route("/v1/artifacts/{artifact_id}/content", api.artifact_content, methods=["GET"]),
        Route("/healthz", api.healthz, methods=["GET"]),
        Route("/readyz", api.readyz, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
        Route("/admin/providers", api.provider_health, methods=["GET"]),
        *admin.routes(),
    ]
    max_body = int(cfg.server.max_body_mb * 1024 * 1024)
    metrics = gateway.metrics if cfg.metrics.enabled else None
    app = Starlette(
        routes=routes,
        # Outermost first: the request id and body limit wrap the key check, so its 401s carry the id.
        middleware=[Middleware(GatewayMiddleware, max_body=max_body, metrics=metrics), Middleware(AuthMiddleware)],
        exception_handlers={ApiError: api_error_handler, HTTPException: http_error_handler},
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app


def _drain_on_sigterm(gateway: Gateway) -> None:
    """Chain onto the server's SIGTERM handler (uvicorn's stops accepting and waits for open
    requests) so the gateway also starts draining: see `Gateway.drain`."""
    if threading.current_thread() is not threading.main_thread():
        return  # an app served from a thread (tests): signals are not ours to take
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: FrameType | None) -> None:
        asyncio.run_coroutine_threadsafe(gateway.drain(), loop)  # a task: anyio needs one
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, handler)


def app_from_env() -> Starlette:
    """The factory each `imagegate serve --workers N` process calls (uvicorn imports it by name)."""
    return create_app(load(os.environ.get("IMAGEGATE_CONFIG") or None))
