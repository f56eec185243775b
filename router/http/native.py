"""Seed 004's family endpoints: `/v2/image/{flux,gemini-3,gpt-image,qwen}/generate`,
`/v2/image/{gpt-image,qwen}/edit` and `/v2/tasks/{task_address}`.

Each family keeps its own field names, defaults, limits and answer shape; `surfaces.native` maps it
to a configured model, whose routes, retries and fallbacks serve it. `"async": true` answers 202
with a task address; polling it gives the status and, once done, the synchronous call's body.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import pybase64
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..errors import ApiError, invalid
from ..pipeline import (
    Base64Text,
    Caller,
    ClientGone,
    ImageAsk,
    Inputs,
    Pipeline,
    Prepared,
    Reply,
    TaskRecord,
    fingerprint,
)
from ..services import Services
from .bodies import read_object
from .context import caller_of, disconnected, idempotency_key, mark
from .responses import JSONResponse, reply_response

SEED = Field(default=None, ge=0, le=2**32 - 1)
QWEN_URL_DAYS = 7
_SIZE = re.compile(r"^\d{1,5}x\d{1,5}$")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    prompt: str
    is_async: bool = Field(default=False, alias="async")
    webhook_url: str | None = Field(default=None, max_length=2048)


class FluxBody(_Body):
    width: int = Field(default=1024, ge=64)
    height: int = Field(default=1024, ge=64)
    seed: int | None = SEED
    safety_tolerance: int = Field(default=2, ge=0, le=6)
    output_format: Literal["png", "jpeg"] = "png"
    input_image: str | None = None
    input_image_2: str | None = None
    input_image_3: str | None = None
    input_image_4: str | None = None

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value % 32:
            raise ValueError("must be a multiple of 32")
        return value


class GeminiBody(_Body):
    aspect_ratio: Literal["1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9"] = "1:1"
    image_size: Literal["1K", "2K", "4K"] = "1K"
    seed: int | None = SEED


class GptImageBody(_Body):
    size: Literal["1024x1024", "1536x1024", "1024x1536", "auto"] = "1024x1024"
    quality: Literal["auto", "low", "medium", "high"] = "auto"
    n: int = Field(default=1, ge=1, le=4)


class GptImageEditBody(GptImageBody):
    image: str
    mask: str | None = None  # white = edit
    size: str = "1024x1024"  # type: ignore[assignment]  # an edit's output size: any WxH the model allows


class QwenBody(_Body):
    size: str = "1024x1024"
    seed: int | None = SEED

    @field_validator("size")
    @classmethod
    def _wxh(cls, value: str) -> str:
        if not _SIZE.match(value):
            raise ValueError("must be WIDTHxHEIGHT, e.g. 1024x1024")
        return value


class QwenEditBody(QwenBody):
    image: str  # an https URL or base64


@dataclass(frozen=True)
class Family:
    name: str  # as in surfaces.native
    body: type[_Body]
    operation: str
    answer: Literal["images", "urls"]  # the key the images come under
    urls: bool  # URLs (signed artifact URLs) rather than base64
    keep_s: int | None = None


FAMILIES = {
    ("flux", "generate"): Family("flux", FluxBody, "generate", "images", urls=False),
    ("gemini-3", "generate"): Family("gemini-3", GeminiBody, "generate", "images", urls=False),
    ("gpt-image", "generate"): Family("gpt-image", GptImageBody, "generate", "images", urls=True),
    ("gpt-image", "edit"): Family("gpt-image", GptImageEditBody, "edit", "images", urls=True),
    ("qwen", "generate"): Family("qwen", QwenBody, "generate", "urls", urls=True, keep_s=QWEN_URL_DAYS * 86400),
    ("qwen", "edit"): Family("qwen-edit", QwenEditBody, "edit", "urls", urls=True, keep_s=QWEN_URL_DAYS * 86400),
}


def _model_of(services: Services, family: Family) -> str:
    native = services.cfg.surfaces.native
    model = native.get(family.name) or (native.get("qwen") if family.name == "qwen-edit" else None)  # type: ignore[call-overload]
    if model is None:
        raise ApiError(404, f"the {family.name} endpoints are not configured: map the family to a model in "
                       f"surfaces.native.{family.name}", code="not_found")
    return services.pipeline.catalog.resolve(model)


def _parse(family: Family, data: dict[str, Any]) -> _Body:
    try:
        return family.body.model_validate({k: v for k, v in data.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        message = f"unknown field '{param}'" if first["type"] == "extra_forbidden" else first["msg"]
        raise invalid(f"invalid value for '{param}': {message}", param) from None


async def _ask(pipeline: Pipeline, family: Family, body: _Body, model_id: str,
               caller: Caller) -> tuple[ImageAsk, Inputs]:
    """The family's fields in the pipeline's terms, and its input images."""
    fields: dict[str, Any] = {"prompt": body.prompt, "model": model_id, "keep_s": family.keep_s,
                              "response_format": f"native:{family.name}", "webhook_url": body.webhook_url}
    refs: list[tuple[str, str]] = []
    if isinstance(body, FluxBody):
        fields.update(size=f"{body.width}x{body.height}", seed=body.seed, output_format=body.output_format,
                      tuning={"safety_tolerance": body.safety_tolerance})
        refs = [(ref, name) for name in ("input_image", "input_image_2", "input_image_3", "input_image_4")
                if (ref := getattr(body, name)) is not None]
    elif isinstance(body, GeminiBody):
        width, height = (int(x) for x in body.aspect_ratio.split(":"))
        side = {"1K": 1024, "2K": 2048, "4K": 4096}[body.image_size]
        fields.update(size=pipeline.catalog.nearest_size(model_id, width / height, side * side), seed=body.seed,
                      tuning={"aspect_ratio": body.aspect_ratio, "image_size": body.image_size})
    elif isinstance(body, GptImageBody):
        fields.update(size=None if body.size == "auto" else body.size, n=body.n,
                      quality=None if body.quality == "auto" else body.quality)
        if isinstance(body, GptImageEditBody):
            refs = [(body.image, "image")]
    elif isinstance(body, QwenBody):
        fields.update(size=body.size, seed=body.seed)
        if isinstance(body, QwenEditBody):
            refs = [(body.image, "image")]
    inputs = Inputs()
    for ref, param in refs:
        image, artifact_id = await pipeline.input_image(ref, param, caller)
        inputs.images.append(image)
        inputs.artifact_ids.append(artifact_id)
    if isinstance(body, GptImageEditBody) and body.mask is not None:
        given, _ = await pipeline.input_image(body.mask, "mask", caller)
        first = inputs.images[0]
        inputs.mask = await pipeline.white_mask(given.data, "mask", (first.width, first.height), invert=False)
    return ImageAsk(**fields), inputs


async def _endpoint(request: Request, family: Family) -> Response:
    services = mark(request, request.url.path)
    pipeline, caller, key = services.pipeline, caller_of(request), idempotency_key(request)
    raw = await read_object(request)
    body = _parse(family, raw)
    model_id = _model_of(services, family)
    request.state.model = model_id
    probe = ImageAsk(prompt=body.prompt, model=model_id)
    pipeline.precheck(probe, caller)  # the model and the key's right to it, before any input is read
    ask, inputs = await _ask(pipeline, family, body, model_id, caller)
    operation = "edit" if inputs.images else "generate"  # flux takes reference images on its generate
    prepared = pipeline.prepare(ask, operation, inputs, caller)
    handle = partial(_reply, request, pipeline, family, prepared, caller, body.is_async)
    reply = await pipeline.idempotent(caller, key, lambda: fingerprint(request.url.path, raw, inputs.blobs()), handle)
    return reply_response(reply)


async def _reply(request: Request, pipeline: Pipeline, family: Family, prepared: Prepared, caller: Caller,
                 as_task: bool) -> Reply:
    if as_task:
        record = await pipeline.submit(prepared, caller)
        return Reply.json({"task_address": record.id, "status": record.status}, status=202,
                          headers={"location": f"/v2/tasks/{record.id}", "x-imagegate-task": record.id})
    try:
        generation = await pipeline.generate(prepared, caller, disconnected(request))
    except ClientGone:
        return Reply(499, b"")
    items: list[Item] = [(image.artifact.id, image.seed, image.b64, image.artifact.expires_at)
                         for image in generation.images if image.artifact is not None]
    body = _answer(pipeline, caller, family, items, prepared.model_id, generation.billing)
    return Reply.json(body, headers={"x-imagegate-model": prepared.model_id,
                                     "x-imagegate-provider": generation.provider,
                                     "x-imagegate-cost": generation.delivered.price.header()})


Item = tuple[str, int | None, Base64Text | str | None, int]  # artifact id, seed, base64 (or None), expires at


def _answer(pipeline: Pipeline, caller: Caller, family: Family, items: list[Item], model_id: str,
            billing: dict[str, Any]) -> dict[str, Any]:
    """The family's answer: its images (base64 or URLs) under its own key, plus model, seeds,
    artifact ids and billing."""
    if family.urls:
        images: list[Base64Text | str] = [pipeline.url_for(caller, art, expires) for art, _, _, expires in items]
    else:
        images = [b64 or "" for _, _, b64, _ in items]
    return {family.answer: images, "model": model_id, "seeds": [seed for _, seed, _, _ in items],
            "artifact_ids": [art for art, _, _, _ in items], "billing": billing}


async def get_task(request: Request) -> Response:
    """GET /v2/tasks/{task_address}: the status, and once done the body the sync call would have."""
    pipeline, caller = mark(request, "/v2/tasks/{task_address}").pipeline, caller_of(request)
    task = await pipeline.tasks.owned(request.path_params["task_address"], caller)
    out: dict[str, Any] = {"task_address": task.id, "status": task.status, "progress": task.progress}
    if task.error is not None:
        out["error"] = task.error
    family = _family_of(task)
    if task.result is not None and family is not None:
        out.update(await _task_answer(pipeline, caller, family, task))
    return JSONResponse(out)


def _family_of(task: TaskRecord) -> Family | None:
    name = task.response_format.removeprefix("native:")
    return next((f for f in FAMILIES.values() if f.name == name and f.operation == task.operation), None) \
        or next((f for f in FAMILIES.values() if f.name == name), None)


async def _task_answer(pipeline: Pipeline, caller: Caller, family: Family, task: TaskRecord) -> dict[str, Any]:
    assert task.result is not None
    data = task.result["data"]
    blobs = {} if family.urls else await pipeline.tasks.images_of(task)
    items: list[Item] = [(item["artifact_id"], item.get("seed"), _b64(blobs.get(item["artifact_id"])),
                          int(task.expires_at)) for item in data]
    billing = {k: v for k, v in task.billing.items() if not k.endswith("_micros")}
    return _answer(pipeline, caller, family, items, task.model, billing)


def _b64(data: bytes | None) -> str | None:
    return pybase64.b64encode(data).decode("ascii") if data is not None else None


def _handler(family: Family) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return await _endpoint(request, family)

    return endpoint


def routes() -> list[Route]:
    endpoints = [Route(f"/v2/image/{name}/{verb}", _handler(family), methods=["POST"])
                 for (name, verb), family in FAMILIES.items()]
    return [*endpoints, Route("/v2/tasks/{task_address}", get_task, methods=["GET"])]

