"""POST /v1/images/generations and /v1/images/edits."""

from __future__ import annotations

import time
from typing import Any

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .errors import ApiError, invalid
from .gateway import Gateway, JSONResponse
from .inputs import form_inputs, json_inputs, media_type, read_form, read_json
from .output import Price, finish_all, images_response, response_items
from .schemas import EditBody, GenerationBody, parse_body
from .validation import Inputs, Prepared, check_extra_fields, prepare


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
        inputs = await json_inputs(data, gw.artifacts, max_pixels)
        body = parse_body(EditBody, data)
    else:
        inputs, fields = await form_inputs(await read_form(request), max_pixels)
        body = parse_body(EditBody, fields)
    return await _serve(request, gw, body, "edit", inputs)


def _prepare(request: Request, gw: Gateway, body: GenerationBody, operation: str, inputs: Inputs) -> Prepared:
    if body.model == "auto":
        return gw.pick_auto(body, operation, inputs)
    model_id = gw.router.resolve(body.model)
    request.state.model = model_id
    model = gw.router.model(model_id)
    prepared = prepare(body, model_id, model, operation, inputs, check_extra_fields(body, model))
    gw.router.check_capable(model_id, prepared.needs)
    return prepared


async def _serve(request: Request, gw: Gateway, body: GenerationBody, operation: str, inputs: Inputs) -> Response:
    prepared = _prepare(request, gw, body, operation, inputs)
    request.state.model = prepared.model_id
    if body.is_async or "respond-async" in request.headers.get("prefer", ""):
        raise invalid("async tasks are not available on this gateway yet", "async", code="unsupported_parameter")
    try:
        with anyio.fail_after(gw.cfg.server.request_timeout_s):
            served = await gw.router.serve(prepared.model_id, prepared.request, prepared.needs)
    except TimeoutError:
        raise ApiError(504, "the request did not finish within the gateway's deadline",
                       code="deadline_exceeded") from None
    req = prepared.request
    images = served.result.images[: req.n]
    if not images:
        raise ApiError(502, "the upstream returned no images", code="upstream_bad_response")
    finished = await finish_all(images, req, gw.cfg.server.max_image_pixels)
    price = Price.of(req.width, req.height, len(finished), gw.router.model(prepared.model_id).price_per_mp)
    gw.count_delivery(prepared.model_id, price, len(finished))
    headers = {"x-imagegate-model": prepared.model_id, "x-imagegate-provider": served.route.provider.name,
               "x-imagegate-cost": price.header()}
    if prepared.stream:
        return _stream(operation, finished, images, req, headers)
    items = await response_items(finished, images, prepared.response_format, gw.artifacts,
                                 gw.base_url(request), owner=None)
    return JSONResponse(images_response(items, finished, req, prepared.model_id, price), headers=headers)


def _stream(operation: str, finished: list[Any], images: list[Any], req: Any, headers: dict[str, str]) -> Response:
    """SSE as OpenAI sends it. Remote upstreams give no previews: one `completed` event per image."""
    kind = "image_generation" if operation == "generate" else "image_edit"
    created = int(time.time())

    async def events() -> Any:
        for done, image in zip(finished, images):
            event = {"type": f"{kind}.completed", "b64_json": done.b64, "created_at": created,
                     "output_format": done.info.format, "size": f"{done.info.width}x{done.info.height}",
                     "quality": req.quality or "auto", "background": req.background or "auto", "seed": image.seed,
                     "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                               "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}}
            yield b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={**headers, "cache-control": "no-cache"})
