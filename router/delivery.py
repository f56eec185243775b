"""From a prepared request to checked images: its routes within the deadline, then the output
normalized. Shared by synchronous answers (router/images.py) and async tasks (router/tasks.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

import anyio
from starlette.requests import Request

from imagegate.providers.base import GeneratedImage

from .attempts import Trail
from .errors import ApiError
from .gateway import Gateway
from .output import Finished, Price, finish_all
from .routing import Served
from .validation import Prepared

T = TypeVar("T")


async def route(gw: Gateway, prepared: Prepared, trail: Trail, watch: Request | None = None,
                timeout_s: float | None = None) -> Served:
    """The routes of the model within the request's deadline (`timeout_s`, else the configured one;
    shortened when the gateway drains). With `watch`, the work is cancelled if that client goes
    away (then `ClientGone`)."""
    try:
        limit = gw.cfg.server.request_timeout_s if timeout_s is None else max(0.0, timeout_s)
        with anyio.fail_after(limit) as scope, gw.tracked(scope):
            work = partial(gw.router.serve, prepared.model_id, prepared.request, prepared.needs, trail,
                           scope.deadline)
            return await (_unless_disconnected(watch, work) if watch is not None else work())
    except TimeoutError:
        headers = {"x-should-retry": "false"} if trail.paid else {}
        if gw.draining:
            raise ApiError(503, "the gateway shut down before the request finished", code="shutting_down",
                           retry_after=1, headers=headers) from None
        raise ApiError(504, "the request did not finish within the gateway's deadline",
                       code="deadline_exceeded", headers=headers) from None


async def deliver(gw: Gateway, prepared: Prepared,
                  served: Served) -> tuple[list[Finished], list[GeneratedImage], Price]:
    """The served images checked and converted as asked, counted, and priced as delivered."""
    req = prepared.request
    images = served.result.images[: req.n]
    if not images:
        raise ApiError(502, "the upstream returned no images", code="upstream_bad_response")
    finished = await finish_all(images, req, gw.cfg.server.max_image_pixels)
    price = Price.of(req.width, req.height, len(finished), gw.router.model(prepared.model_id).price_per_mp)
    gw.count_delivery(prepared.model_id, price, len(finished))
    return finished, images, price


class ClientGone(Exception):
    """The client disconnected; its work was cancelled."""


async def _unless_disconnected(request: Request, work: Callable[[], Awaitable[T]]) -> T:
    """Run `work`, cancelling it (and so any upstream task it polls) if the client goes away."""
    result: list[T] = []
    failure: Exception | None = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            # The body is read by now: the next ASGI message is the disconnect (or the end of the exchange).
            while (await request.receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        async def run() -> None:
            nonlocal failure
            try:
                result.append(await work())
            except Exception as exc:  # re-raised below as itself, not wrapped in an ExceptionGroup
                failure = exc
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        tg.start_soon(run)
    if failure is not None:
        raise failure
    if not result:
        raise ClientGone()
    return result[0]
