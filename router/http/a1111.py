"""The AUTOMATIC1111 surface: `/sdapi/v1/*`, also under `/v2/automatic1111/sdapi/v1/*` (seed 004).

A1111 clients (webuiapi, SillyTavern, Open WebUI's A1111 engine, Krita and Photoshop plugins)
get every configured model as a checkpoint, with the pipeline's validation, routing, holds,
limits, idempotency and metrics. Parse (a1111_schemas.py) → pipeline → render A1111's answer.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import orjson
import pybase64
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..pipeline import (
    MAX_INPUT_IMAGES,
    Caller,
    ClientGone,
    Generation,
    Inputs,
    Interrupted,
    Pipeline,
    Prepared,
    Reply,
    fingerprint,
)
from ..services import Services
from .a1111_schemas import FieldError, Img2ImgBody, Txt2ImgBody, parse, strip_hash
from .bodies import read_json, read_object
from .context import caller_of, disconnected, idempotency_key, mark
from .responses import JSONResponse, reply_response

PREFIXES = ("/sdapi/v1", "/v2/automatic1111/sdapi/v1")
MODEL = "model"  # the caller's preference that A1111 calls sd_model_checkpoint


def _hash(model_id: str) -> str:
    """A stable stand-in for a checkpoint's sha256 (clients compare it, none recompute it)."""
    return hashlib.sha256(model_id.encode()).hexdigest()


def _checkpoint(model_id: str) -> dict[str, Any]:
    return {"title": model_id, "model_name": model_id, "hash": _hash(model_id)[:10], "sha256": _hash(model_id),
            "filename": model_id, "config": None}


def _services(request: Request) -> Services:
    return mark(request, request.url.path)  # A1111's paths have no parameters: the path is the template


async def _current_model(services: Services, caller: Caller, fresh: bool = False) -> str | None:
    """The caller's chosen checkpoint while it still names a model, else the default model.
    `fresh`: read the store now (GET /options), not a read of the last second (a generation)."""
    catalog, accounts = services.pipeline.catalog, services.accounts
    chosen = (await accounts.preferences(caller)).get(MODEL) if fresh else await accounts.preference(caller, MODEL)
    if chosen is not None and catalog.knows(chosen):
        return chosen
    fallback = services.cfg.default_model or next(iter(catalog.generating()), None)
    return catalog.resolve(fallback) if fallback is not None else None


# -- catalog and options ------------------------------------------------------------------------

async def sd_models(request: Request) -> Response:
    catalog = _services(request).pipeline.catalog
    return JSONResponse([_checkpoint(m) for m in catalog.generating()])


async def get_options(request: Request) -> Response:
    services = _services(request)
    model = await _current_model(services, caller_of(request), fresh=True)
    return JSONResponse({"sd_model_checkpoint": model, "sd_checkpoint_hash": _hash(model) if model else None,
                         "samples_format": "png", "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic",
                         "eta_noise_seed_delta": 0, "show_progress_every_n_steps": 1})


async def set_options(request: Request) -> Response:
    """`sd_model_checkpoint` is kept for the caller (gateway-wide with auth off); clients post the
    whole options object back, so every other key is accepted and ignored."""
    services, caller = _services(request), caller_of(request)
    options = await read_object(request)
    name = options.get("sd_model_checkpoint")
    if name is not None:
        if not isinstance(name, str):
            raise FieldError("sd_model_checkpoint", "sd_model_checkpoint must be a string")
        model_id = services.pipeline.catalog.resolve(strip_hash(name))  # unknown: 404, never a silent swap
        caller.check_model(model_id)
        await services.accounts.prefer(caller, MODEL, model_id)
    return JSONResponse(None)


def _configured(services: Services, option: str) -> list[str]:
    """The sampler (or scheduler) names configured on this gateway's A1111 providers and routes."""
    names = {raw[option] for raw in services.cfg.providers.values()
             if raw.get("type") == "a1111" and isinstance(raw.get(option), str)}
    names |= {r.options[option] for m in services.cfg.models.values() for r in m.routes
              if isinstance(r.options.get(option), str)}
    return sorted(names)


async def samplers(request: Request) -> Response:
    names = _configured(_services(request), "sampler") or ["Default"]
    return JSONResponse([{"name": n, "aliases": [], "options": {}} for n in names])


async def schedulers(request: Request) -> Response:
    names = ["Automatic", *_configured(_services(request), "scheduler")]
    return JSONResponse([{"name": n.lower(), "label": n, "aliases": None, "default_rho": -1,
                          "need_inner_model": False} for n in names])


def _fixed(answer: Any) -> Callable[[Request], Awaitable[Response]]:
    """An endpoint whose answer is always the same (lists this gateway has nothing in)."""

    async def endpoint(request: Request) -> Response:
        _services(request)
        return JSONResponse(answer)

    return endpoint


async def cmd_flags(request: Request) -> Response:
    services = _services(request)
    return JSONResponse({"api": True, "nowebui": True, "api_auth": services.cfg.auth.enabled, "listen": True,
                         "port": services.cfg.server.port})


async def memory(request: Request) -> Response:
    _services(request)
    page, pages, free = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_AVPHYS_PAGES")
    return JSONResponse({"ram": {"free": free * page, "used": (pages - free) * page, "total": pages * page},
                         "cuda": {"error": "this gateway does not report its backends' GPUs here"}})


# -- progress and interrupt -----------------------------------------------------------------------

async def progress(request: Request) -> Response:
    """The caller's own running requests on this replica (A1111's is the server's one job)."""
    jobs = _services(request).pipeline.jobs.of(caller_of(request))
    job = jobs[0] if jobs else None
    fraction = job.fraction if job else 0.0
    elapsed = time.time() - job.started_at if job else 0.0
    image = None
    if job is not None and job.preview is not None and request.query_params.get("skip_current_image") != "true":
        image = pybase64.b64encode(job.preview).decode("ascii")
    state = {"skipped": False, "interrupted": bool(job and job.interrupted), "stopping_generation": False,
             "job": job.model_id if job else "", "job_count": len(jobs),
             "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.gmtime(job.started_at)) if job else "0",
             "job_no": 0, "sampling_step": job.step if job else 0, "sampling_steps": job.steps if job else 0}
    return JSONResponse({"progress": fraction, "eta_relative": elapsed / fraction - elapsed if fraction else 0.0,
                         "state": state, "current_image": image, "textinfo": None, "current_task": None})


async def interrupt(request: Request) -> Response:
    """Stop the caller's running requests (only its own); they answer with no images, uncharged."""
    _services(request).pipeline.jobs.interrupt(caller_of(request))
    return JSONResponse({})


# -- txt2img and img2img --------------------------------------------------------------------------

async def txt2img(request: Request) -> Response:
    return await _generate(request, Txt2ImgBody, "generate")


async def img2img(request: Request) -> Response:
    return await _generate(request, Img2ImgBody, "edit")


async def _generate(request: Request, schema: type[Txt2ImgBody], operation: str) -> Response:
    services = _services(request)
    pipeline, caller, key = services.pipeline, caller_of(request), idempotency_key(request)
    raw = await read_json(request)
    body = parse(schema, raw)
    model = body.checkpoint() or await _current_model(services, caller)
    inputs, strength = Inputs(), None
    if isinstance(body, Img2ImgBody):
        inputs, strength = await _img2img_inputs(pipeline, body, caller), body.denoising_strength
    prepared = pipeline.prepare(body.ask(model, strength), operation, inputs, caller,
                                partial(setattr, request.state, "model"))
    path = request.url.path.removeprefix("/v2/automatic1111")
    reply = await pipeline.idempotent(caller, key, lambda: fingerprint(path, raw, inputs.blobs()),
                                      partial(_answer, request, pipeline, prepared, caller, body))
    return reply_response(reply)


async def _img2img_inputs(pipeline: Pipeline, body: Img2ImgBody, caller: Caller) -> Inputs:
    if not body.init_images:
        raise FieldError("init_images", "init_images is required: the image to start from", "missing")
    if len(body.init_images) > MAX_INPUT_IMAGES:
        raise FieldError("init_images", f"at most {MAX_INPUT_IMAGES} input images")
    inputs = Inputs()
    for i, ref in enumerate(body.init_images):
        image, artifact_id = await pipeline.input_image(ref, f"init_images[{i}]", caller)
        inputs.images.append(image)
        inputs.artifact_ids.append(artifact_id)
    images = inputs.images
    if body.mask is not None:
        given, _ = await pipeline.input_image(body.mask, "mask", caller)
        first = images[0]
        inputs.mask = await pipeline.white_mask(given.data, "mask", (first.width, first.height),
                                                bool(body.inpainting_mask_invert))
    return inputs


async def _answer(request: Request, pipeline: Pipeline, prepared: Prepared, caller: Caller,
                  body: Txt2ImgBody) -> Reply:
    try:
        generation = await pipeline.generate(prepared, caller, disconnected(request))
    except Interrupted:  # as A1111 after /interrupt: an answer, here with no images and no charge
        return Reply.json({"images": [], "parameters": _parameters(body),
                           "info": orjson.dumps({"interrupted": True, "imagegate": {"model": prepared.model_id,
                                                                                     "cost": 0.0}}).decode()})
    except ClientGone:
        return Reply(499, b"")  # nobody is listening; nginx's code for the logs
    headers = {"x-imagegate-model": prepared.model_id, "x-imagegate-provider": generation.provider,
               "x-imagegate-cost": generation.delivered.price.header()}
    images = [image.b64 for image in generation.images] if body.send_images else []
    return Reply.json({"images": images, "parameters": _parameters(body),
                       "info": orjson.dumps(_info(generation, body)).decode()}, headers=headers)


def _parameters(body: Txt2ImgBody) -> dict[str, Any]:
    """The request as A1111 echoes it; input images are not echoed back."""
    echoed = body.model_dump()
    for field in ("init_images", "mask"):
        if field in echoed:
            echoed[field] = None
    return echoed


def _info(generation: Generation, body: Txt2ImgBody) -> dict[str, Any]:
    prepared = generation.prepared
    req, model_id = prepared.request, prepared.model_id
    first = generation.images[0].info
    seeds = [image.seed if image.seed is not None else req.seed_for(i) for i, image in enumerate(generation.images)]
    sampler = str(generation.metadata.get("sampler_name") or req.tuning.get("sampler") or "Default")
    steps = req.steps or body.steps or 0
    cfg = req.guidance_scale if req.guidance_scale is not None else (body.cfg_scale or 0.0)
    negative = req.negative_prompt or ""
    settings = f"Steps: {steps}, Sampler: {sampler}, CFG scale: {cfg}, Size: {first.width}x{first.height}, " \
               f"Model hash: {_hash(model_id)[:10]}, Model: {model_id}"
    infotexts = [f"{req.prompt}\n" + (f"Negative prompt: {negative}\n" if negative else "")
                 + settings.replace("Size:", f"Seed: {seed}, Size:") for seed in seeds]
    count = len(seeds)
    return {
        "prompt": req.prompt, "all_prompts": [req.prompt] * count, "negative_prompt": negative,
        "all_negative_prompts": [negative] * count, "seed": seeds[0], "all_seeds": seeds, "subseed": -1,
        "all_subseeds": [-1] * count, "subseed_strength": 0, "width": first.width, "height": first.height,
        "sampler_name": sampler, "cfg_scale": cfg, "steps": steps, "batch_size": body.batch_size,
        "restore_faces": False, "sd_model_name": model_id, "sd_model_hash": _hash(model_id)[:10],
        "denoising_strength": req.strength or 0, "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": infotexts, "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "version": "imagegate",
        "imagegate": {"model": model_id, "provider": generation.provider,
                      "cost": float(generation.delivered.price.cost), "billing": generation.billing},
    }


# -- the routes -----------------------------------------------------------------------------------

_EMPTY_LISTS = ("upscalers", "latent-upscale-modes", "sd-vae", "sd-modules", "loras", "hypernetworks",
                "face-restorers", "realesrgan-models", "prompt-styles", "script-info", "extensions")
ENDPOINTS: list[tuple[str, str, Callable[[Request], Awaitable[Response]]]] = [
    ("POST", "/txt2img", txt2img),
    ("POST", "/img2img", img2img),
    ("GET", "/sd-models", sd_models),
    ("GET", "/options", get_options),
    ("POST", "/options", set_options),
    ("GET", "/samplers", samplers),
    ("GET", "/schedulers", schedulers),
    ("GET", "/cmd-flags", cmd_flags),
    ("GET", "/memory", memory),
    ("GET", "/progress", progress),
    ("POST", "/interrupt", interrupt),
    ("POST", "/skip", interrupt),  # one image per job here: skipping it is interrupting it
    ("POST", "/refresh-checkpoints", _fixed(None)),
    ("GET", "/embeddings", _fixed({"loaded": {}, "skipped": {}})),
    ("GET", "/scripts", _fixed({"txt2img": [], "img2img": []})),
    *[("GET", f"/{name}", _fixed([])) for name in _EMPTY_LISTS],
]


def routes() -> list[Route]:
    return [Route(prefix + path, handler, methods=[method])
            for prefix in PREFIXES for method, path, handler in ENDPOINTS]

