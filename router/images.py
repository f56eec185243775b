"""POST /v1/images/generations and /v1/images/edits."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from providers.base import GeneratedImage

from . import billing
from .attempts import Trail
from .auth import check_model, model_filter
from .errors import ApiError, invalid
from .fetch import Policy
from .gateway import Gateway, JSONResponse
from .inputs import form_inputs, json_inputs, media_type, read_form, read_json
from .output import Finished, Price, finish_all, images_response, response_items
from .schemas import EditBody, GenerationBody, parse_body
from .routing import Served
from .streaming import completed_stream, live_stream
from .validation import Inputs, Prepared, check_extra_fields, prepare

T = TypeVar("T")
CLIENT_CLOSED = 499


def _mark(request: Request, endpoint: str) -> Gateway:
    request.state.endpoint = endpoint
    return request.app.state.gateway


async def generations(request: Request) -> Response:
    gw = _mark(request, "/v1/images/generations")
    body = parse_body(GenerationBody, await read_json(request))
    return await _serve(request, gw, body, "generate", Inputs())


async def edits(request: Request) -> Response:
    gw = _mark(request, "/v1/images/edits")
    max_pixels = gw.cfg.server.max_image_pixels
    if media_type(request) == "application/json":
        data = await read_json(request)
        if not isinstance(data, dict):
            raise invalid("the request body must be a JSON object", code="invalid_json")
        # URLs are fetched here, before routing: a refused one costs no upstream call and stores nothing.
        fetch = Policy.of(gw.cfg.inputs) if gw.cfg.inputs.url_fetch else None
        inputs = await json_inputs(data, gw.artifacts, max_pixels, fetch)
        body = parse_body(EditBody, data)
    else:
        inputs, fields = await form_inputs(await read_form(request), max_pixels)
        body = parse_body(EditBody, fields)
    return await _serve(request, gw, body, "edit", inputs)


def _prepare(request: Request, gw: Gateway, body: GenerationBody, operation: str, inputs: Inputs) -> Prepared:
    if body.model == "auto":
        return gw.pick_auto(body, operation, inputs, model_filter(request))
    model_id = gw.router.resolve(body.model)
    request.state.model = model_id
    check_model(request, model_id)  # after resolving: a key's list names models, not their aliases
    model = gw.router.model(model_id)
    prepared = prepare(body, model_id, model, operation, inputs, check_extra_fields(body, model))
    gw.router.check_capable(model_id, prepared.needs)
    return prepared


async def _serve(request: Request, gw: Gateway, body: GenerationBody, operation: str, inputs: Inputs) -> Response:
    if gw.draining:
        raise ApiError(503, "the gateway is shutting down; retry on another replica", code="shutting_down",
                       retry_after=1, headers={"connection": "close"})
    prepared = _prepare(request, gw, body, operation, inputs)
    request.state.model = prepared.model_id
    if body.is_async or "respond-async" in request.headers.get("prefer", ""):
        raise invalid("async tasks are not available on this gateway yet", "async", code="unsupported_parameter")
    hold = await billing.place(request, gw, prepared)  # 402 here: nothing routed, no upstream call
    if prepared.stream and prepared.request.partial_images:
        req = prepared.request
        price = Price.of(req.width, req.height, req.n, gw.router.model(prepared.model_id).price_per_mp)
        headers = {"x-imagegate-model": prepared.model_id, "x-imagegate-cost": price.header()}
        stream = live_stream(operation, req, headers, partial(_produce, request, gw, prepared, hold))
        return _SettleAfter(stream, gw, hold)
    try:
        return await _respond(request, gw, prepared, operation, hold)
    finally:
        await billing.settle(gw, hold)  # whatever happened: captures what was delivered, releases the rest


async def _respond(request: Request, gw: Gateway, prepared: Prepared, operation: str,
                   hold: billing.Hold | None) -> Response:
    served = await _route(request, gw, prepared, Trail())
    if served is None:
        return Response(status_code=CLIENT_CLOSED)  # nobody is listening; nginx's code for the logs
    try:
        return await _answer(request, gw, prepared, served, operation, hold)
    except ApiError as exc:
        exc.headers["x-should-retry"] = "false"  # the upstream did the (paid) work; repeating pays again
        raise


class _SettleAfter:
    """A live stream runs inside its response: settle the hold once the response is over, however
    it ended (finished, failed, client gone). Settling twice is harmless: the store ignores the second."""

    def __init__(self, response: Response, gw: Gateway, hold: billing.Hold | None) -> None:
        self.response, self.gw, self.hold = response, gw, hold

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.response(scope, receive, send)
        finally:
            await billing.settle(self.gw, self.hold)


async def _produce(request: Request, gw: Gateway, prepared: Prepared,
                   hold: billing.Hold | None) -> tuple[list[Finished], list[GeneratedImage]]:
    """A streamed request's images (the stream itself watches for the client going away)."""
    served = await _route(request, gw, prepared, Trail(), watch=False)
    assert served is not None
    finished, images, price = await _deliver(gw, prepared, served)
    if hold is not None:
        hold.captured = price.cost_micros
    return finished, images


async def _route(request: Request, gw: Gateway, prepared: Prepared, trail: Trail, *,
                 watch: bool = True) -> Served | None:
    """The routes of the model within the request's deadline (shortened when the gateway drains)."""
    try:
        with anyio.fail_after(gw.cfg.server.request_timeout_s) as scope, gw.tracked(scope):
            work = partial(gw.router.serve, prepared.model_id, prepared.request, prepared.needs, trail,
                           scope.deadline)
            return await _unless_disconnected(request, work) if watch else await work()
    except TimeoutError:
        headers = {"x-should-retry": "false"} if trail.paid else {}
        if gw.draining:
            raise ApiError(503, "the gateway shut down before the request finished", code="shutting_down",
                           retry_after=1, headers=headers) from None
        raise ApiError(504, "the request did not finish within the gateway's deadline",
                       code="deadline_exceeded", headers=headers) from None


async def _deliver(gw: Gateway, prepared: Prepared,
                   served: Served) -> tuple[list[Finished], list[GeneratedImage], Price]:
    req = prepared.request
    images = served.result.images[: req.n]
    if not images:
        raise ApiError(502, "the upstream returned no images", code="upstream_bad_response")
    finished = await finish_all(images, req, gw.cfg.server.max_image_pixels)
    price = Price.of(req.width, req.height, len(finished), gw.router.model(prepared.model_id).price_per_mp)
    gw.count_delivery(prepared.model_id, price, len(finished))
    return finished, images, price


async def _answer(request: Request, gw: Gateway, prepared: Prepared, served: Served, operation: str,
                  hold: billing.Hold | None) -> Response:
    finished, images, price = await _deliver(gw, prepared, served)
    headers = {"x-imagegate-model": prepared.model_id, "x-imagegate-provider": served.route.provider.name,
               "x-imagegate-cost": price.header()}
    if prepared.stream:
        response: Response = completed_stream(operation, finished, images, prepared.request, headers)
    else:
        items = await response_items(finished, images, prepared.response_format, gw.artifacts,
                                     gw.base_url(request), owner=None)
        body = images_response(items, finished, prepared.request, prepared.model_id, price)
        if hold is not None:
            body["billing"].update(hold.body(price.cost_micros))
        response = JSONResponse(body, headers=headers)
    if hold is not None:
        hold.captured = price.cost_micros  # delivered: the caller's settle captures this much
    return response


async def _unless_disconnected(request: Request, work: Callable[[], Awaitable[T]]) -> T | None:
    """Run `work`, cancelling it (and so any upstream task it polls) if the client goes away."""
    result: T | None = None
    failure: Exception | None = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            # The body is read by now: the next ASGI message is the disconnect (or the end of the exchange).
            while (await request.receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        async def run() -> None:
            nonlocal result, failure
            try:
                result = await work()
            except Exception as exc:  # re-raised below as itself, not wrapped in an ExceptionGroup
                failure = exc
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        tg.start_soon(run)
    if failure is not None:
        raise failure
    return result
