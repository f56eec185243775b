"""`a1111`: AUTOMATIC1111 stable-diffusion-webui, Forge and SD.Next through their `/sdapi/v1` API.

Generations go to `txt2img`, edits to `img2img` (inpainting when a mask is given). The route's model
is switched per request with `override_settings.sd_model_checkpoint`, and left loaded afterwards
(`override_settings_restore_afterwards: false`): swapping a checkpoint back costs seconds to minutes.
Every tuning field is sent explicitly because the three servers' defaults differ.

A1111 silently replaces an unknown checkpoint (with the loaded one) and an unknown sampler (with
the first one), so by default both names are checked once against `/sd-models` and `/samplers`.
"""

from __future__ import annotations

import base64
import logging
import secrets
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import http
from .base import GeneratedImage, ImageRequest, ProviderResult, UpstreamError
from .imaging import white_edit_mask
from .options import HTTPProviderOptions
from .remote import HTTPProvider

log = logging.getLogger("imagegate")

# Fields the gateway's pricing, sizing and seed bookkeeping depend on: never taken from params or extras.
PROTECTED = frozenset({"prompt", "width", "height", "seed", "batch_size", "n_iter", "init_images", "mask",
                       "send_images", "save_images", "force_task_id", "override_settings_restore_afterwards"})
CHECKPOINT = "sd_model_checkpoint"


def _no_protected(params: dict[str, Any]) -> dict[str, Any]:
    taken = sorted(PROTECTED & params.keys())
    if taken:
        raise ValueError(f"{', '.join(taken)} cannot be set here: the gateway sets them for each request")
    return params


def _no_checkpoint(settings: dict[str, Any]) -> dict[str, Any]:
    if CHECKPOINT in settings:
        raise ValueError(f"{CHECKPOINT} is the route's `model:`, not an override")
    return settings


class A1111Options(HTTPProviderOptions):
    base_url: str = "http://127.0.0.1:7860"
    # A1111 runs one generation at a time (a global queue lock); more in flight only queue up there.
    max_concurrency: int = Field(default=1, ge=1)
    # HTTP Basic, as set with `--api-auth user:pass` (SD.Next: `--auth`); empty = no auth.
    username: str = ""
    password: str = ""
    sampler: str = "DPM++ 2M"
    scheduler: str | None = None  # A1111 >= 1.9 / Forge, e.g. "Karras"; unset = the server's "Automatic"
    steps: int = Field(default=30, ge=1, le=150)  # when neither the request nor the model's defaults say
    cfg_scale: float = Field(default=7.0, ge=0, le=30)
    denoising_strength: float = Field(default=0.75, ge=0, le=1)
    # Inpainting: keep the original pixels under the mask as the starting point (1 = "original"),
    # work on the whole picture (not only the masked area) so the output keeps the asked size and
    # framing, and feather the mask edge a little so the seam does not show.
    inpainting_fill: int = Field(default=1, ge=0, le=3)
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = Field(default=32, ge=0)
    mask_blur: int = Field(default=4, ge=0, le=64)
    # Extra A1111 options for every request (e.g. {CLIP_stop_at_last_layers: 2}) and extra request fields.
    override_settings: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    check_names: bool = True
    interrupt_on_cancel: bool = True

    _params = field_validator("params")(_no_protected)
    _settings = field_validator("override_settings")(_no_checkpoint)

    @model_validator(mode="after")
    def _no_api_key(self) -> A1111Options:
        if self.api_key:
            raise ValueError("a1111 takes no api_key: use username and password (HTTP Basic)")
        return self


class RouteOptions(BaseModel):
    """The extra keys of a YAML route entry this kind reads; others (e.g. `family`) are ignored."""

    model_config = ConfigDict(extra="ignore")

    sampler: str | None = None
    scheduler: str | None = None
    override_settings: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)

    _params = field_validator("params")(_no_protected)
    _settings = field_validator("override_settings")(_no_checkpoint)


class A1111Provider(HTTPProvider):
    kind = "a1111"
    honours = frozenset({"negative_prompt", "steps", "guidance_scale"})
    # Several init images are a batch to A1111, not references: no multi-reference. No alpha output.
    capabilities = frozenset({"generate", "edit", "inpaint"})
    Options = A1111Options
    options: A1111Options
    # A local A1111 without --api-auth takes no credentials at all.
    requires_api_key = False

    def __init__(self, name: str, options: A1111Options) -> None:
        super().__init__(name, options)
        self._checkpoints: set[str] | None = None
        self._samplers: set[str] | None = None
        self._catalog_lock = anyio.Lock()

    def auth_headers(self) -> dict[str, str]:
        if not (self.options.username or self.options.password):
            return {}
        token = base64.b64encode(f"{self.options.username}:{self.options.password}".encode()).decode()
        return {"authorization": f"Basic {token}"}

    def secrets(self) -> list[str]:
        return [self.options.password]

    def missing_settings(self) -> list[str]:
        # One half of a credential pair is an unset variable, not a server without auth.
        if self.options.username and not self.options.password:
            return ["password"]
        if self.options.password and not self.options.username:
            return ["username"]
        return []

    def unsupported(self, request: ImageRequest) -> str | None:
        if request.width % 8 or request.height % 8:
            return f"{request.size} is not a multiple of 8 on each side (Stable Diffusion latents)"
        if len(request.images) > 1:
            return "A1111 takes one init image (a list is a batch to it, not references)"
        taken = sorted(PROTECTED & request.extra.keys())
        if taken:
            return f"{', '.join(taken)} cannot be set by the client: the gateway sets them"
        settings = request.extra.get("override_settings", {})
        if not isinstance(settings, dict):
            return "override_settings must be an object"
        if CHECKPOINT in settings:
            return f"override_settings.{CHECKPOINT} is chosen by the model's route"
        return None

    # -- the call --------------------------------------------------------------------------------
    async def run(self, request: ImageRequest) -> ProviderResult:
        route = self._route_options(request)
        # A sampler the client named (the A1111 surface passes it on) wins over the configured ones.
        sampler = request.tuning.get("sampler") or route.sampler or self.options.sampler
        if self.options.check_names:
            await self._check_names(request.upstream_model, sampler)
        payload = self._payload(request, route, sampler)
        endpoint = "txt2img" if request.operation == "generate" else "img2img"
        body = await self._generate_call(f"{self.base}/sdapi/v1/{endpoint}", payload)
        images, info = _images(body, request)
        return ProviderResult(images=images, metadata={
            "sd_model_name": info.get("sd_model_name"), "sampler_name": info.get("sampler_name")})

    def _route_options(self, request: ImageRequest) -> RouteOptions:
        try:
            return RouteOptions.model_validate(request.route_options)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise UpstreamError(f"route option {where} of provider '{self.name}' is invalid: {first['msg']}",
                                status=502, code="upstream_misconfigured", fallback=True) from None

    def _payload(self, request: ImageRequest, route: RouteOptions, sampler: str) -> dict[str, Any]:
        opts = self.options
        payload: dict[str, Any] = {
            "prompt": request.prompt, "negative_prompt": request.negative_prompt or "",
            "steps": request.steps if request.steps is not None else opts.steps,
            "cfg_scale": request.guidance_scale if request.guidance_scale is not None else opts.cfg_scale,
            "sampler_name": sampler,
        }
        scheduler = request.tuning.get("scheduler") or route.scheduler or opts.scheduler
        if scheduler:
            payload["scheduler"] = scheduler
        if request.operation == "edit":
            payload.update(self._img2img_fields(request))
        extra = dict(request.extra)
        settings = {**opts.override_settings, **route.override_settings, **extra.pop("override_settings", {}),
                    CHECKPOINT: request.upstream_model}
        # Later wins: computed fields < provider params < route params < the client's allowed extras.
        payload.update({**opts.params, **route.params, **extra})
        payload.update({
            "width": request.width, "height": request.height, "seed": request.seed,
            "batch_size": request.n, "n_iter": 1,
            "override_settings": settings, "override_settings_restore_afterwards": False,
            "send_images": True, "save_images": False,
            "force_task_id": f"imagegate-{secrets.token_hex(8)}",
        })
        return payload

    def _img2img_fields(self, request: ImageRequest) -> dict[str, Any]:
        opts = self.options
        strength = request.strength if request.strength is not None else opts.denoising_strength
        fields: dict[str, Any] = {
            "init_images": [base64.b64encode(request.images[0].data).decode()],
            # 0 = just resize to width x height, unless the client (an A1111 one) chose.
            "denoising_strength": strength, "resize_mode": request.tuning.get("resize_mode", 0),
        }
        if request.mask is not None:
            inpaint = {"inpainting_fill": opts.inpainting_fill, "inpaint_full_res": opts.inpaint_full_res,
                       "inpaint_full_res_padding": opts.inpaint_full_res_padding, "mask_blur": opts.mask_blur}
            fields.update({
                # OpenAI: transparent = edit; A1111: white = edit (or opaque alpha, so never send alpha).
                "mask": base64.b64encode(white_edit_mask(request.mask.data)).decode(),
                "inpainting_mask_invert": 0,
                **{name: request.tuning.get(name, default) for name, default in inpaint.items()},
            })
        return fields

    async def _generate_call(self, url: str, payload: dict[str, Any]) -> Any:
        try:
            # orjson: the body carries megabytes of base64 on img2img.
            return await self.call("POST", url, content=orjson.dumps(payload),
                                   headers={"content-type": "application/json"})
        except anyio.get_cancelled_exc_class():
            if self.options.interrupt_on_cancel:
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await self._interrupt(payload["force_task_id"])
            raise

    async def _interrupt(self, task_id: str) -> None:
        """Stop our job if, and only if, it is the one running: `/interrupt` stops whatever runs.

        `/internal/progress` says whether a task id is the active one; servers started with
        `--nowebui` lack it, and then nothing is interrupted (a job still queued is not either).
        """
        try:
            response = await self.send("POST", f"{self.base}/internal/progress",
                                       json={"id_task": task_id, "id_live_preview": -1, "live_preview": False})
            state = http.parse_json(response) if response.status_code == 200 else None
            if isinstance(state, dict) and state.get("active") is True:
                await self.send("POST", f"{self.base}/sdapi/v1/interrupt")
                log.info("provider %s: interrupted cancelled task %s", self.name, task_id)
        except UpstreamError:
            pass

    # -- checkpoint and sampler names ------------------------------------------------------------
    async def _check_names(self, checkpoint: str, sampler: str) -> None:
        async with self._catalog_lock:
            if self._checkpoints is None or (self._checkpoints and checkpoint not in self._checkpoints):
                # Fetched again on a miss: checkpoints appear after a refresh on the server.
                self._checkpoints = await self._names("sd-models", _checkpoint_names)
            if self._samplers is None:
                self._samplers = await self._names("samplers", _sampler_names)
        if self._checkpoints and checkpoint not in self._checkpoints:
            raise UpstreamError(f"the upstream has no checkpoint '{self.clean(checkpoint, 200)}'", status=502,
                                code="upstream_not_found", fallback=True)
        if self._samplers and not _sampler_known(sampler, self._samplers):
            raise UpstreamError(f"the upstream has no sampler '{self.clean(sampler, 100)}'", status=502,
                                code="upstream_not_found", fallback=True)

    async def _names(self, endpoint: str, extract: Callable[[dict[str, Any]], list[str]]) -> set[str] | None:
        """Names from a discovery endpoint: empty (never checked) where the server lacks or garbles the
        endpoint, None (not checked this time, asked again next time) on a passing failure."""
        try:
            items = await self.call("GET", f"{self.base}/sdapi/v1/{endpoint}")
        except UpstreamError as exc:
            if exc.code in ("upstream_auth_failed", "upstream_unavailable", "upstream_timeout"):
                raise  # the generation would fail the same way
            return set() if exc.code == "upstream_not_found" else None
        if not isinstance(items, list):
            return set()
        return {name for item in items if isinstance(item, dict) for name in extract(item)}

    # -- errors ----------------------------------------------------------------------------------
    def error(self, response: httpx.Response) -> UpstreamError:
        status = response.status_code
        message, param = _error_text(response)
        message = self.clean(" ".join(message.split())) or f"HTTP {status}"
        if status == 401:
            return http.error_for_status(status, message)
        if status in (400, 422):
            return UpstreamError(f"upstream rejected the request: {message}", status=400, code="upstream_rejected",
                                 param=param)
        return http.error_for_status(status, message, retry_after=http.retry_after_seconds(response))


def _error_text(response: httpx.Response) -> tuple[str, str | None]:
    """The readable part of an A1111 error body, and the field it names when FastAPI says which.

    A1111's middleware answers {error, detail, body, errors} (SD.Next adds `code`); `body` may echo the
    request, images and all, so it is never shown. FastAPI's own 422 is {"detail": [{loc, msg, type}]}.
    """
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return "", None
    if not isinstance(body, dict):
        return "", None
    detail = body.get("detail")
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        first = detail[0]
        loc = [str(p) for p in first.get("loc") or [] if p != "body"]
        text = f"{'.'.join(loc)}: {first.get('msg', '')}" if loc else str(first.get("msg", ""))
        return text, (loc[0] if loc else None)
    if isinstance(detail, str) and detail:
        return detail, None
    errors = body.get("errors")
    return (errors if isinstance(errors, str) else ""), None


def _images(body: Any, request: ImageRequest) -> tuple[list[GeneratedImage], dict[str, Any]]:
    if not isinstance(body, dict) or not isinstance(body.get("images"), list):
        raise http.bad_response("upstream answer has no images")
    info = body.get("info")
    if isinstance(info, str):  # A1111 sends `info` as a JSON document inside a string
        try:
            info = orjson.loads(info)
        except orjson.JSONDecodeError:
            raise http.bad_response("upstream `info` is not JSON") from None
    if not isinstance(info, dict):
        raise http.bad_response("upstream answer has no `info` object")
    first = info.get("index_of_first_image")
    first = first if isinstance(first, int) and first >= 0 else 0
    # A grid may come first (index_of_first_image), extension outputs (ControlNet maps…) last.
    items = body["images"][first:first + request.n]
    if len(items) < request.n:
        raise http.bad_response(f"upstream returned {len(items)} of {request.n} images")
    seeds = info.get("all_seeds")
    if not (isinstance(seeds, list) and len(seeds) >= request.n and all(isinstance(s, int) for s in seeds)):
        seeds = [request.seed_for(i) for i in range(request.n)]
    return [http.decode_b64_image(b64, seed=seeds[i]) for i, b64 in enumerate(items)], info


def _checkpoint_names(item: dict[str, Any]) -> list[str]:
    """The names `sd_model_checkpoint` accepts for one `/sd-models` entry (A1111's CheckpointInfo.ids)."""
    title = str(item.get("title") or "")
    filename = str(item.get("filename") or "").replace("\\", "/").rsplit("/", 1)[-1]
    names = [title, title.split(" [", 1)[0], str(item.get("model_name") or ""), filename,
             filename.rsplit(".", 1)[0], str(item.get("hash") or ""), str(item.get("sha256") or "")]
    return [n for n in names if n]


def _sampler_names(item: dict[str, Any]) -> list[str]:
    aliases = item.get("aliases")
    return [str(n).lower() for n in [item.get("name"), *(aliases if isinstance(aliases, list) else [])] if n]


def _sampler_known(name: str, known: set[str]) -> bool:
    """Known by name or alias; an older combined name ("DPM++ 2M Karras") counts by its sampler part."""
    name = name.lower()
    return name in known or any(name.startswith(f"{k} ") for k in known)
