"""The Starlette application: the one route table, the middleware, and the lifespan that opens the
services (router/services.py) and closes them."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Route

from . import runtime
from .config import Config, SurfacesConfig, load
from .errors import ApiError
from .http import a1111, admin, health, native, openai_images, openai_resources, task_views, ui
from .http.auth import AuthMiddleware
from .http.middleware import GatewayMiddleware
from .http.responses import api_error_handler, http_error_handler
from .metrics import Metrics
from .pipeline.drain import Drain
from .services import open_services

OPENAI = [
    Route("/v1/images/generations", openai_images.generations, methods=["POST"]),
    Route("/v1/images/edits", openai_images.edits, methods=["POST"]),
    Route("/v1/images/image-to-image", openai_images.image_to_image, methods=["POST"]),
    Route("/v1/models", openai_resources.list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", openai_resources.get_model, methods=["GET"]),
    Route("/v1/usage", openai_resources.usage, methods=["GET"]),
    Route("/v1/uploads", openai_resources.upload, methods=["POST"]),
    Route("/v1/artifacts/{artifact_id}/content", openai_resources.artifact_content, methods=["GET"]),
    Route("/v1/tasks/{task_id}", task_views.get_task, methods=["GET"]),
    Route("/v1/tasks/{task_id}/cancel", task_views.cancel_task, methods=["POST"]),
]
OPERATIONS = [
    Route("/healthz", health.healthz, methods=["GET"]),
    Route("/readyz", health.readyz, methods=["GET"]),
    Route("/metrics", health.metrics, methods=["GET"]),
    Route("/admin/providers", admin.provider_health, methods=["GET"]),
    Route("/admin/usage", admin.usage_by_model, methods=["GET"]),
    Route("/admin/keys", admin.create_key, methods=["POST"]),
    Route("/admin/keys", admin.list_keys, methods=["GET"]),
    Route("/admin/keys/{key_id}/revoke", admin.revoke_key, methods=["POST"]),
    Route("/admin/keys/{key_id}/topup", admin.topup_key, methods=["POST"]),
    Route("/admin/keys/{key_id}/webhook-secret", admin.rotate_webhook_secret, methods=["POST"]),
]


def routes(surfaces: SurfacesConfig) -> list[Route]:
    """The route table: the surfaces the config turns on, and the operator's endpoints."""
    return [*(OPENAI if surfaces.openai else []), *(a1111.routes() if surfaces.a1111 else []), *native.routes(),
            *(ui.routes() if surfaces.ui else []), *OPERATIONS]


def create_app(cfg: Config, on_started: Callable[[], None] | None = None) -> Starlette:
    """The app for `cfg`. `on_started`: called once its services are open, before the first
    request (`imagegate serve` tunes its process's garbage collector there)."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with open_services(cfg, metrics) as services:
            app.state.gateway = services  # what router/http/context.py hands to handlers
            _drain_on_sigterm(services.pipeline.drain)
            if on_started is not None:
                on_started()
            yield
        Metrics.process_exit()

    max_body = int(cfg.server.max_body_mb * 1024 * 1024)
    return Starlette(
        routes=routes(cfg.surfaces),
        # Outermost first: the request id and body limit wrap the key check, so its 401s carry the id.
        middleware=[Middleware(GatewayMiddleware, max_body=max_body, metrics=metrics if cfg.metrics.enabled else None),
                    Middleware(AuthMiddleware)],
        exception_handlers={ApiError: api_error_handler, HTTPException: http_error_handler},
        lifespan=lifespan,
    )


def _drain_on_sigterm(drain: Drain) -> None:
    """Chain onto the server's SIGTERM handler (uvicorn's stops accepting and waits for open
    requests) so the gateway also starts draining: see `Drain.start`."""
    if threading.current_thread() is not threading.main_thread():
        return  # an app served from a thread (tests): signals are not ours to take
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: FrameType | None) -> None:
        asyncio.run_coroutine_threadsafe(drain.start(), loop)  # a task: anyio needs one
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, handler)


def app_from_env() -> Starlette:
    """The factory each `imagegate serve --workers N` process calls (uvicorn imports it by name)."""
    return create_app(load(os.environ.get("IMAGEGATE_CONFIG") or None), on_started=runtime.freeze_startup_objects)
