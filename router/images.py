"""POST /v1/images/generations and /v1/images/edits."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from imagegate.providers.base import GeneratedImage

from .admission import Admitted, admit, fingerprint, idempotency_key, idempotent
from .attempts import Trail
from .auth import check_model, model_filter, owner_id
from .delivery import ClientGone, deliver, route
from .errors import ApiError, invalid
from .fetch import Policy
from .gateway import Gateway, JSONResponse
from .inputs import form_inputs, json_inputs, media_type, read_form, read_json
from .output import Finished, Price, images_response, response_items
from .schemas import EditBody, GenerationBody, parse_body
from .routing import Served
from .streaming import completed_stream, live_stream
from .tasks import accepted
from .validation import Inputs, Prepared, check_extra_fields, prepare

CLIENT_CLOSED = 499
GENERATIONS, EDITS = "/v1/images/generations", "/v1/images/edits"


def _mark(request: Request, endpoint: str) -> Gateway:
    request.state.endpoint = endpoint
    return request.app.state.gateway


def _blobs(inputs: Inputs) -> list[bytes]:
    return [image.data for image in inputs.images] + ([inputs.mask.data] if inputs.mask else [])


async def generations(request: Request) -> Response:
    gw = _mark(request, GENERATIONS)
    raw = await read_json(request)
    body = parse_body(GenerationBody, raw)
    return await _serve(request, gw, body, "generate", Inputs(), lambda: fingerprint(GENERATIONS, raw))


async def edits(request: Request) -> Response:
    gw = _mark(request, EDITS)
    max_pixels = gw.cfg.server.max_image_pixels
    if media_type(request) == "application/json":
        data = await read_json(request)
        if not isinstance(data, dict):
            raise invalid("the request body must be a JSON object", code="invalid_json")
        # URLs are fetched here, before routing: a refused one costs no upstream call and stores nothing.
        fetch = Policy.of(gw.cfg.inputs) if gw.cfg.inputs.url_fetch else None
        inputs = await json_inputs(data, gw.artifacts, max_pixels, fetch, owner=owner_id(request))
        fields = data
    else:
        inputs, fields = await form_inputs(await read_form(request), max_pixels)
    body = parse_body(EditBody, fields)
    return await _serve(request, gw, body, "edit", inputs, lambda: fingerprint(EDITS, fields, _blobs(inputs)))


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


async def _serve(request: Request, gw: Gateway, body: GenerationBody, operation: str, inputs: Inputs,
                 print_: Callable[[], str]) -> Response:
    if gw.draining:
        raise ApiError(503, "the gateway is shutting down; retry on another replica", code="shutting_down",
                       retry_after=1, headers={"connection": "close"})
    prepared = _prepare(request, gw, body, operation, inputs)
    request.state.model = prepared.model_id
    as_task = bool(body.is_async) or "respond-async" in request.headers.get("prefer", "")
    key = idempotency_key(request)
    if prepared.stream and as_task:
        raise invalid("a request is either streamed or run as an async task, not both", "async")
    if prepared.stream and key is not None:
        raise invalid("Idempotency-Key cannot be used with stream: true (a stream cannot be replayed)",
                      "Idempotency-Key")
    return await idempotent(request, gw, key, print_, partial(_admitted, request, gw, prepared, operation, as_task))


async def _admitted(request: Request, gw: Gateway, prepared: Prepared, operation: str, as_task: bool) -> Response:
    admitted = await admit(request, gw, prepared)  # 429 or 402 here: nothing routed, no upstream call
    if as_task:
        try:
            record = await gw.tasks.submit(request, prepared, operation, admitted)
        except BaseException:
            await admitted.close(gw)
            raise
        return accepted(gw, request, record)  # the task now owns the hold and the slot
    if prepared.stream and prepared.request.partial_images:
        req = prepared.request
        price = Price.of(req.width, req.height, req.n, gw.router.model(prepared.model_id).price_per_mp)
        headers = {"x-imagegate-model": prepared.model_id, "x-imagegate-cost": price.header()}
        stream = live_stream(operation, req, headers, partial(_produce, gw, prepared, admitted))
        return _CloseAfter(stream, gw, admitted)
    try:
        return await _respond(request, gw, prepared, operation, admitted)
    finally:
        await admitted.close(gw)  # whatever happened: captures what was delivered, releases the rest


async def _respond(request: Request, gw: Gateway, prepared: Prepared, operation: str,
                   admitted: Admitted) -> Response:
    try:
        served = await route(gw, prepared, Trail(), watch=request)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)  # nobody is listening; nginx's code for the logs
    try:
        return await _answer(request, gw, prepared, served, operation, admitted)
    except ApiError as exc:
        exc.headers["x-should-retry"] = "false"  # the upstream did the (paid) work; repeating pays again
        raise


class _CloseAfter:
    """A live stream runs inside its response: give back what it holds once the response is over,
    however it ended (finished, failed, client gone). Settling twice is harmless."""

    def __init__(self, response: Response, gw: Gateway, admitted: Admitted) -> None:
        self.response, self.gw, self.admitted = response, gw, admitted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.response(scope, receive, send)
        finally:
            await self.admitted.close(self.gw)


async def _produce(gw: Gateway, prepared: Prepared,
                   admitted: Admitted) -> tuple[list[Finished], list[GeneratedImage]]:
    """A streamed request's images (the stream itself watches for the client going away)."""
    served = await route(gw, prepared, Trail())
    finished, images, price = await deliver(gw, prepared, served)
    if admitted.hold is not None:
        admitted.hold.captured = price.cost_micros
    return finished, images


async def _answer(request: Request, gw: Gateway, prepared: Prepared, served: Served, operation: str,
                  admitted: Admitted) -> Response:
    finished, images, price = await deliver(gw, prepared, served)
    hold = admitted.hold
    headers = {"x-imagegate-model": prepared.model_id, "x-imagegate-provider": served.route.provider.name,
               "x-imagegate-cost": price.header()}
    if prepared.stream:
        response: Response = completed_stream(operation, finished, images, prepared.request, headers)
    else:
        items = await response_items(finished, images, prepared.response_format, gw.artifacts,
                                     gw.base_url(request), owner=owner_id(request))
        body = images_response(items, finished, prepared.request, prepared.model_id, price)
        if hold is not None:
            body["billing"].update(hold.body(price.cost_micros))
        response = JSONResponse(body, headers=headers)
    if hold is not None:
        hold.captured = price.cost_micros  # delivered: the caller's settle captures this much
    return response
