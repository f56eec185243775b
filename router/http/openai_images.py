"""The OpenAI Images surface: POST /v1/images/generations and /v1/images/edits.

Parse (JSON or multipart, into an `ImageAsk`) → the pipeline → render (an ImagesResponse, a
server-sent event stream, or a 202 task)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from starlette.requests import Request
from starlette.responses import Response

from ..errors import invalid
from ..pipeline import (
    Caller,
    ClientGone,
    Generation,
    ImageRefs,
    Inputs,
    Pipeline,
    Prepared,
    Reply,
    fingerprint,
    image_item,
    images_body,
)
from ..services import Services
from .bodies import form_inputs, media_type, read_form, read_json, read_object
from .context import caller_of, disconnected, idempotency_key, mark
from .openai_schemas import EditBody, GenerationBody, ImageToImageBody, parse_body
from .responses import JSONResponse, reply_response
from .sse import completed_stream, live_stream
from .task_views import accepted

CLIENT_CLOSED = 499  # nginx's code for "the client went away", for the logs
GENERATIONS, EDITS, IMAGE_TO_IMAGE = "/v1/images/generations", "/v1/images/edits", "/v1/images/image-to-image"


async def generations(request: Request) -> Response:
    services = mark(request, GENERATIONS)
    raw = await read_json(request)
    body = parse_body(GenerationBody, raw)
    return await _serve(request, services, body, "generate", Inputs(), lambda: fingerprint(GENERATIONS, raw),
                        artifacts=_keeps(services, body))


async def edits(request: Request) -> Response:
    services = mark(request, EDITS)
    if media_type(request) == "application/json":
        fields = await read_object(request)
        refs = ImageRefs.take(fields)
        body = parse_body(EditBody, fields)
        services.pipeline.precheck(body.ask(), caller_of(request))  # before any URL is fetched
        inputs = await services.pipeline.resolve_inputs(refs, caller_of(request))
    else:
        inputs, fields = await form_inputs(await read_form(request), services.cfg.server.max_image_pixels)
        body = parse_body(EditBody, fields)
    return await _serve(request, services, body, "edit", inputs, lambda: fingerprint(EDITS, fields, inputs.blobs()),
                        artifacts=_keeps(services, body))


def _keeps(services: Services, body: GenerationBody) -> bool:
    """Whether the answer's images are kept as artifacts: always for URLs, by configuration for base64."""
    return body.response_format == "url" or services.cfg.artifacts.keep_b64_answers


async def image_to_image(request: Request) -> Response:
    """Seed 003's endpoint: `image` plus up to 15 `extra_images` (URLs, artifact ids, data URIs);
    answered 202 with the task unless `"async": false`."""
    services = mark(request, IMAGE_TO_IMAGE)
    fields = await read_object(request)
    refs = ImageRefs.take_references(fields)
    body = parse_body(ImageToImageBody, fields)
    services.pipeline.precheck(body.ask(), caller_of(request))  # before any URL is fetched
    inputs = await services.pipeline.resolve_inputs(refs, caller_of(request))
    return await _serve(request, services, body, "edit", inputs,
                        lambda: fingerprint(IMAGE_TO_IMAGE, fields, inputs.blobs()), as_task=body.is_async is not False)


async def _serve(request: Request, services: Services, body: GenerationBody, operation: str, inputs: Inputs,
                 print_: Callable[[], str], as_task: bool | None = None, artifacts: bool = True) -> Response:
    pipeline, caller = services.pipeline, caller_of(request)
    ask = body.ask(artifacts=artifacts)
    prepared = pipeline.prepare(ask, operation, inputs, caller, partial(setattr, request.state, "model"))
    if body.dry_run:
        return JSONResponse(pipeline.quote(prepared), headers={"x-imagegate-model": prepared.model_id,
                                                               "x-imagegate-cost": prepared.price.header()})
    if as_task is None:
        as_task = bool(body.is_async) or "respond-async" in request.headers.get("prefer", "")
    key = idempotency_key(request)
    if prepared.stream and as_task:
        raise invalid("a request is either streamed or run as an async task, not both", "async")
    if prepared.stream and key is not None:
        raise invalid("Idempotency-Key cannot be used with stream: true (a stream cannot be replayed)",
                      "Idempotency-Key")
    if prepared.stream:
        return await _stream(request, pipeline, prepared, caller)
    handle = partial(_reply, request, pipeline, prepared, caller, as_task)
    reply = await pipeline.idempotent(caller, key, print_, handle)
    return reply_response(reply)


def _headers(generation: Generation) -> dict[str, str]:
    return {"x-imagegate-model": generation.prepared.model_id, "x-imagegate-provider": generation.provider,
            "x-imagegate-cost": generation.delivered.price.header(),
            "x-imagegate-fallback": "true" if generation.fallback else "false"}


async def _reply(request: Request, pipeline: Pipeline, prepared: Prepared, caller: Caller, as_task: bool) -> Reply:
    if as_task:
        record = await pipeline.submit(prepared, caller)
        return accepted(pipeline, caller, record)
    try:
        generation = await pipeline.generate(prepared, caller, disconnected(request))
    except ClientGone:
        return Reply(CLIENT_CLOSED, b"")  # nobody is listening
    if prepared.response_format == "url":
        items = [image_item(image, url=pipeline.url_of(caller, image.artifact), artifact_id=image.artifact.id)
                 for image in generation.images if image.artifact is not None]
    else:
        items = [image_item(image, b64_json=image.b64, **({} if image.artifact is None else
                                                          {"artifact_id": image.artifact.id}))
                 for image in generation.images]
    body = images_body(items, generation.delivered, prepared, generation.billing, generation.inputs)
    return Reply.json(body, headers=_headers(generation))


async def _stream(request: Request, pipeline: Pipeline, prepared: Prepared, caller: Caller) -> Response:
    """Server-sent events (never replayed: streams take no Idempotency-Key). Without previews, the
    completed images once they are ready; with them, the generation runs inside the response."""
    if not prepared.request.partial_images:
        try:
            generation = await pipeline.generate(prepared, caller, disconnected(request))
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        return completed_stream(generation, _headers(generation))
    admitted = await pipeline.admit(prepared, caller)
    headers = {"x-imagegate-model": prepared.model_id, "x-imagegate-cost": prepared.price.header()}
    # A finished run has settled already; `release` gives back what an unfinished one holds.
    return live_stream(prepared, headers, partial(pipeline.run, prepared, caller, admitted),
                       partial(pipeline.release, admitted))
