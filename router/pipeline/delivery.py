"""From a prepared request to checked images: its routes within the deadline, then the output
normalized and priced as delivered. Shared by synchronous answers, streams and async tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

import anyio

from ..artifacts import ArtifactStore
from ..errors import ApiError
from ..metrics import Metrics
from ..routing import ModelRouter, Served, Trail
from .asks import Inputs
from .drain import Drain
from .normalize import DeliveredImage, finish_all
from .results import Delivered
from .validation import Prepared

T = TypeVar("T")
# Waits until the client has gone away; the surface makes it from its connection.
Gone = Callable[[], Awaitable[None]]


class ClientGone(Exception):
    """The client disconnected; its work was cancelled."""


class Delivery:
    def __init__(self, router: ModelRouter, artifacts: ArtifactStore, drain: Drain, metrics: Metrics, *,
                 request_timeout_s: float, max_image_pixels: int) -> None:
        self.router, self.artifacts, self.drain, self.metrics = router, artifacts, drain, metrics
        self.request_timeout_s, self.max_image_pixels = request_timeout_s, max_image_pixels

    async def route(self, prepared: Prepared, trail: Trail, gone: Gone | None = None,
                    timeout_s: float | None = None) -> Served:
        """The routes of the model within the request's deadline (`timeout_s`, else the configured one;
        shortened when the gateway drains). With `gone`, the work is cancelled if the client goes
        away (then `ClientGone`)."""
        try:
            limit = self.request_timeout_s if timeout_s is None else max(0.0, timeout_s)
            with anyio.fail_after(limit) as scope, self.drain.tracked(scope):
                work = partial(self.router.serve, prepared.model_id, prepared.request, prepared.needs, trail,
                               scope.deadline)
                return await (_unless_gone(gone, work) if gone is not None else work())
        except TimeoutError:
            headers = {"x-should-retry": "false"} if trail.paid else {}
            if self.drain.draining:
                raise ApiError(503, "the gateway shut down before the request finished", code="shutting_down",
                               retry_after=1, headers=headers) from None
            raise ApiError(504, "the request did not finish within the gateway's deadline",
                           code="deadline_exceeded", headers=headers) from None

    async def deliver(self, prepared: Prepared, served: Served) -> Delivered:
        """The served images checked and converted as asked, counted, and priced as delivered."""
        req = prepared.request
        images = served.result.images[: req.n]
        if not images:
            raise ApiError(502, "the upstream returned no images", code="upstream_bad_response")
        finished = await finish_all(images, req, self.max_image_pixels)
        price = prepared.price.for_images(len(finished))
        self.metrics.delivered(prepared.model_id, len(finished), float(price.megapixels), float(price.cost))
        return Delivered(finished, price)

    async def keep_inputs(self, inputs: Inputs, owner: str | None) -> list[str]:
        """Every input image as an artifact of `owner` (stored by content: the same bytes once), so
        a follow-up call can name it; the ids, in order."""
        ids = []
        for index, image in enumerate(inputs.images):
            known = inputs.artifact_of(index)
            if known is None:
                known = (await self.artifacts.put(image.data, content_type=image.content_type, width=image.width,
                                                  height=image.height, owner=owner, by_content=True)).id
            ids.append(known)
        return ids

    async def store(self, images: list[DeliveredImage], owner: str | None, ttl_s: int | None = None) -> None:
        """Keep each image as an artifact of `owner` (url answers, task results)."""
        for image in images:
            info = image.info
            image.artifact = await self.artifacts.put(image.data, content_type=f"image/{info.format}",
                                                      width=info.width, height=info.height, owner=owner,
                                                      ttl_s=ttl_s)


async def _unless_gone(gone: Gone, work: Callable[[], Awaitable[T]]) -> T:
    """Run `work`, cancelling it (and so any upstream task it polls) if the client goes away.

    `work` runs in this task and only the watch is a task of its own, with no task group: a group
    of two cost a task, and anyio's cancellation of the watch when the work ends, on every request
    (bench/gateway_overhead.py, README Performance)."""
    with anyio.CancelScope() as scope:
        watch, cancel = asyncio.ensure_future(gone()), partial(_cancel_if_gone, scope)
        watch.add_done_callback(cancel)
        try:
            return await work()
        finally:
            watch.remove_done_callback(cancel)
            watch.cancel()
    raise ClientGone()


def _cancel_if_gone(scope: anyio.CancelScope, watch: asyncio.Future[None]) -> None:
    # Called when the watch ends: by the client's disconnect, or cancelled once the work is done.
    if not watch.cancelled() and watch.exception() is None:
        scope.cancel()
