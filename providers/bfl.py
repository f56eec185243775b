"""`bfl`: the Black Forest Labs FLUX API (https://api.bfl.ai).

Every call is asynchronous upstream: `POST /v1/<model>` answers `{id, polling_url, cost, …}`; we poll
the RETURNED `polling_url` (it may name another cluster) with the `x-key` header until a terminal
status, parsing the JSON `status` whatever the HTTP code (BFL answers some terminal states with 503
and pending ones with 202), then download `result.sample` at once: a signed URL valid ten minutes.
There is no `n` upstream: n images are n tasks in parallel, with seeds seed, seed+1, …

The key travels to `polling_url`, so only hosts we trust are polled: base_url's and `polling_hosts`.

The request fields differ by model family (derived from the upstream model name, or the route option
`family`): FLUX.2 and FLUX.1 take width/height, ultra and Kontext an `aspect_ratio` (the gateway
fits their fixed-area output to the asked size), Fill takes `image` + a white-is-edit `mask`.
`unsupported` refuses what the family cannot take, so BFL never sees a request it would refuse.

Cancellation: BFL's public API has no cancel endpoint. When the client goes away, the request
deadline passes or the instance's `timeout_s` runs out, our coroutine is cancelled and polling
simply stops; the task still runs (and is charged) upstream, and its result is never fetched.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import anyio
import httpx
import pybase64
from pydantic import Field

from . import aio, http, imaging
from .base import GeneratedImage, ImageRequest, ProviderResult, UpstreamError
from .options import HTTPProviderOptions
from .remote import HTTPProvider

FAMILIES = ("flux2", "flux1", "ultra", "kontext", "fill")
FLUX2_MAX_PIXELS = 2048 * 2048  # "up to 4 MP", 2048x2048 being the documented largest
MODERATED = {"Request Moderated": "request", "Content Moderated": "generated image"}
FAILED = {"Error", "Failed", "Task not found"}  # `Failed`: seen in some clients, not in the docs
# BFL's field names as the client knows them, for the `param` of a 422.
PARAMS: dict[str, str | None] = {
    "prompt": "prompt", "width": "size", "height": "size", "aspect_ratio": "size", "seed": "seed",
    "steps": "steps", "guidance": "guidance_scale", "output_format": "output_format", "image": "image",
    "mask": "mask", "safety_tolerance": None, "prompt_upsampling": None, "raw": None,
}


class BFLOptions(HTTPProviderOptions):
    base_url: str = "https://api.bfl.ai"
    # Results come from delivery-*.bfl.ai (the exact host changes: a wildcard, as BFL advises).
    download_hosts: list[str] = Field(default_factory=lambda: [".bfl.ai"])
    # Hosts `polling_url` may name (besides base_url's): the key is sent there.
    polling_hosts: list[str] = Field(default_factory=lambda: [".bfl.ai", ".bfl.ml"])
    poll_interval_s: float = Field(default=0.5, gt=0)
    poll_max_interval_s: float = Field(default=5.0, gt=0)
    # Transient poll failures (5xx, 429, connection) tolerated in a row: the task is already paid for.
    max_poll_errors: int = Field(default=3, ge=0)
    safety_tolerance: int = Field(default=2, ge=0, le=6)
    prompt_upsampling: bool = False


def family_of(model: str, override: Any = None) -> str | None:
    """The request-field family of an upstream model name (the route's `family:` wins)."""
    if override is not None:
        return override if override in FAMILIES else None
    name = model.lower()
    if name.startswith("flux-2-"):
        return "flux2"
    if name.startswith("flux-kontext-"):
        return "kontext"
    if name.startswith("flux-pro-1.1-ultra"):
        return "ultra"
    if name in ("flux-pro-1.0-fill", "flux-fill"):
        return "fill"
    if name in ("flux-pro-1.1", "flux-pro", "flux-dev"):
        return "flux1"
    return None


def max_references(family: str, model: str) -> int:
    if family == "flux2":
        return 4 if "klein" in model.lower() else 8
    return {"kontext": 4, "fill": 1}.get(family, 0)


def tuning_ranges(family: str, model: str) -> tuple[tuple[int, int], tuple[float, float]] | None:
    """(steps range, guidance range) where the model takes them; None where it has neither."""
    name = model.lower()
    if family == "flux2" and name.startswith("flux-2-flex"):
        return (1, 50), (1.5, 10.0)
    if family == "flux1" and name in ("flux-pro", "flux-dev"):
        return (1, 50), (1.5, 5.0)
    if family == "fill":
        return (15, 50), (1.5, 100.0)
    return None


def aspect_ratio(width: int, height: int) -> str:
    g = math.gcd(width, height)
    return f"{width // g}:{height // g}"


def size_problem(family: str, width: int, height: int) -> str | None:
    """Why this family cannot make a width x height image, or None."""
    if family == "flux2":
        if width % 16 or height % 16 or min(width, height) < 64 or width * height > FLUX2_MAX_PIXELS:
            return f"FLUX.2 needs sides that are multiples of 16, at least 64, at most 4 MP (got {width}x{height})"
    elif family == "flux1":
        if width % 32 or height % 32 or not (256 <= width <= 1440 and 256 <= height <= 1440):
            return f"FLUX.1 needs sides that are multiples of 32 within 256-1440 (got {width}x{height})"
    elif family in ("ultra", "kontext") and not 9 / 21 <= width / height <= 21 / 9:
        return f"aspect ratio {aspect_ratio(width, height)} is outside 21:9 to 9:21"
    return None


def reasons(details: Any) -> str:
    """The strings inside BFL's `details` (e.g. {"Moderation Reasons": [...]}), flattened and bounded."""
    found: list[str] = []

    def walk(value: Any, depth: int) -> None:
        if isinstance(value, str) and value.strip():
            found.append(" ".join(value.split())[:100])
        elif isinstance(value, dict) and depth < 3:
            for item in value.values():
                walk(item, depth + 1)
        elif isinstance(value, list) and depth < 3:
            for item in value[:10]:
                walk(item, depth + 1)

    walk(details, 0)
    return ", ".join(dict.fromkeys(found))[:300]


class BFLProvider(HTTPProvider):
    kind = "bfl"
    honours = frozenset({"steps", "guidance_scale"})
    capabilities = frozenset({"generate", "edit", "inpaint", "multi-reference"})
    Options = BFLOptions
    options: BFLOptions

    def __init__(self, name: str, options: BFLOptions) -> None:
        super().__init__(name, options)
        # Accept a base_url written with or without the /v1 suffix.
        self.api = self.base if self.base.endswith("/v1") else f"{self.base}/v1"

    def auth_headers(self) -> dict[str, str]:
        return {"x-key": self.options.api_key}

    # -- what this upstream can do ---------------------------------------------------------------
    def unsupported(self, request: ImageRequest) -> str | None:
        model = request.upstream_model
        family = family_of(model, request.route_options.get("family"))
        if family is None:
            return f"unknown BFL model '{model}' (set the route's family: to one of {', '.join(FAMILIES)})"
        tolerance = request.route_options.get("safety_tolerance")
        if tolerance is not None and (type(tolerance) is not int or not 0 <= tolerance <= 6):
            return "the route option safety_tolerance must be an integer from 0 to 6"
        if family == "fill":
            if request.operation != "edit" or request.mask is None or len(request.images) != 1:
                return f"{model} only inpaints: one image and a mask"
        elif request.mask is not None:
            return f"{model} takes no mask (inpainting needs flux-pro-1.0-fill)"
        elif request.operation == "edit" and max_references(family, model) == 0:
            return f"{model} cannot edit images"
        if len(request.images) > max_references(family, model):
            return f"{model} takes at most {max_references(family, model)} input images"
        return size_problem(family, request.width, request.height)

    # -- the call --------------------------------------------------------------------------------
    async def run(self, request: ImageRequest) -> ProviderResult:
        fields = await self._fields(request)
        done = await aio.gather([partial(self._one, request, fields, i) for i in range(request.n)])
        costs = [cost for _, _, cost in done if isinstance(cost, (int, float))]
        return ProviderResult(images=[image for image, _, _ in done],
                              metadata={"task_ids": [task for _, task, _ in done],
                                        "cost_credits": sum(costs) if costs else None})

    async def _fields(self, request: ImageRequest) -> dict[str, Any]:
        """The submit body shared by the n tasks (only the seed differs); images encoded once."""
        model, options = request.upstream_model, request.route_options
        family = family_of(model, options.get("family"))
        assert family is not None  # `unsupported` ran first
        tolerance = options.get("safety_tolerance", self.options.safety_tolerance)
        asked = request.tuning.get("safety_tolerance")  # a client's, within the operator's bound
        if isinstance(asked, int):
            tolerance = min(asked, tolerance)
        fields: dict[str, Any] = {
            "prompt": request.prompt,
            "output_format": "jpeg" if request.output_format == "jpeg" else "png",  # no webp: the gateway converts
            "safety_tolerance": min(tolerance, 5) if family == "flux2" else tolerance,
        }
        upsampling = bool(options.get("prompt_upsampling", self.options.prompt_upsampling))
        if family != "flux2" or upsampling:  # not in FLUX.2's reference: sent there only when asked for
            fields["prompt_upsampling"] = upsampling
        if family in ("flux2", "flux1"):
            fields["width"], fields["height"] = request.width, request.height
        elif family in ("ultra", "kontext"):
            fields["aspect_ratio"] = aspect_ratio(request.width, request.height)
        if family == "ultra" and "raw" in options:
            fields["raw"] = bool(options["raw"])
        fields.update(_tuning(request, family))
        fields.update(await _images(request, family))
        # Pass-through fields first: what the gateway set (size, moderation, images) is what it
        # checked and bills for, and a client must not replace it.
        return {**request.extra, **fields}

    async def _one(self, request: ImageRequest, fields: dict[str, Any], i: int) -> tuple[GeneratedImage, str, Any]:
        seed = request.seed_for(i)
        answer = await self.call("POST", f"{self.api}/{request.upstream_model}", json={**fields, "seed": seed})
        task_id = answer.get("id") if isinstance(answer, dict) else None
        polling_url = answer.get("polling_url") if isinstance(answer, dict) else None
        if not isinstance(task_id, str) or not isinstance(polling_url, str) or not task_id or not polling_url:
            raise http.bad_response("upstream submit answer has no id or polling_url")
        self._check_polling_url(polling_url)
        result = await self._wait(polling_url)
        return await self._image(result, seed, request.prompt), task_id, answer.get("cost")

    def _check_polling_url(self, url: str) -> None:
        """The key goes wherever polling_url points: only to hosts we trust, never in clear after https."""
        trusted = [http.base_host(self.base), *self.options.polling_hosts]
        downgrade = self.base.startswith("https:") and not url.startswith("https:")
        if downgrade or not http.host_allowed(url, trusted):
            raise http.bad_response("upstream returned a polling URL on a host it does not own")

    async def _wait(self, url: str) -> dict[str, Any]:
        """Poll until Ready (the Ready answer's `result`); moderation and failures raise."""
        errors = 0

        async def check() -> dict[str, Any] | None:
            nonlocal errors
            try:
                result = await self._poll_once(url)
            except UpstreamError as exc:
                if not exc.retryable or errors >= self.options.max_poll_errors:
                    raise
                errors += 1
                return None
            errors = 0
            return result

        return await aio.poll(check, interval_s=self.options.poll_interval_s,
                              max_interval_s=self.options.poll_max_interval_s)

    async def _poll_once(self, url: str) -> dict[str, Any] | None:
        response = await self.send("GET", url)
        try:
            body = http.parse_json(response)
        except UpstreamError:
            if response.status_code >= 300:
                raise self.error(response) from None
            raise
        status = body.get("status") if isinstance(body, dict) else None
        if not isinstance(status, str):
            if response.status_code >= 300:
                raise self.error(response)
            raise http.bad_response("upstream poll answer has no status")
        if status == "Ready":
            result = body.get("result")
            if not isinstance(result, dict) or not isinstance(result.get("sample"), str) or not result["sample"]:
                raise http.bad_response("upstream task is Ready without result.sample")
            return result
        why = reasons(body.get("details"))
        if status in MODERATED:
            message = f"the upstream refused the {MODERATED[status]} under its content policy"
            raise UpstreamError(self.clean(f"{message} ({why})" if why else message), status=400,
                                code="content_policy_violation", fallback=False)
        if status in FAILED:
            raise UpstreamError(self.clean(f"the upstream task ended with '{status}'" + (f": {why}" if why else "")),
                                status=502, code="upstream_task_failed", fallback=True)
        return None  # Pending, or a state this adapter does not know: keep polling within the deadline

    async def _image(self, result: dict[str, Any], seed: int, prompt: str) -> GeneratedImage:
        sample = result["sample"]
        if sample.startswith("data:"):
            image = http.decode_b64_image(sample)
        else:
            image = GeneratedImage(data=await self.download(sample))  # now: the URL expires in 10 minutes
        reported = result.get("seed")
        image.seed = reported if type(reported) is int and 0 <= reported < 2**32 else seed
        if isinstance(result.get("prompt"), str) and result["prompt"] != prompt:
            image.revised_prompt = result["prompt"]  # prompt_upsampling rewrote it
        return image

    def error(self, response: httpx.Response) -> UpstreamError:
        status = response.status_code
        message, param = _detail(response)
        message = self.clean(message or f"HTTP {status}")
        if status == 402:
            return UpstreamError("the upstream account is out of credits", status=502,
                                 code="upstream_quota_exceeded", fallback=True)
        if status < 400:  # a redirect: never followed with the key on
            return http.bad_response(f"upstream answered HTTP {status}")
        error = http.error_for_status(status, message, retry_after=http.retry_after_seconds(response))
        if error.status == 400:
            error.param = param
        return error


def _tuning(request: ImageRequest, family: str) -> dict[str, Any]:
    ranges = tuning_ranges(family, request.upstream_model)
    if ranges is None:
        return {}
    (low_steps, high_steps), (low_guidance, high_guidance) = ranges
    fields: dict[str, Any] = {}
    if request.steps is not None:
        fields["steps"] = max(low_steps, min(high_steps, request.steps))
    if request.guidance_scale is not None:
        fields["guidance"] = max(low_guidance, min(high_guidance, request.guidance_scale))
    return fields


async def _images(request: ImageRequest, family: str) -> dict[str, Any]:
    """Input images as base64: `input_image`, `input_image_2`, … or Fill's `image` + `mask`."""
    if not request.images:
        return {}
    encoded = [pybase64.b64encode(img.data).decode("ascii") for img in request.images]
    if family == "fill":
        assert request.mask is not None
        # OpenAI: transparent = edit; Fill: white = inpaint. Pixel work off the event loop.
        mask = await anyio.to_thread.run_sync(imaging.white_edit_mask, request.mask.data)
        return {"image": encoded[0], "mask": pybase64.b64encode(mask).decode("ascii")}
    return {("input_image" if i == 0 else f"input_image_{i + 1}"): data for i, data in enumerate(encoded)}


def _detail(response: httpx.Response) -> tuple[str | None, str | None]:
    """FastAPI's error body: `detail` as text, or a list of {loc, msg, type} (422) → message and param."""
    try:
        body = http.parse_json(response)
    except UpstreamError:
        return None, None
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, str):
        return detail, None
    if not isinstance(detail, list):
        return None, None
    parts, params = [], []
    for item in detail[:5]:
        if not isinstance(item, dict):
            continue
        loc = [str(p) for p in item.get("loc") or [] if p != "body"] if isinstance(item.get("loc"), list) else []
        parts.append(f"{'.'.join(loc) or 'body'}: {item.get('msg', 'invalid')}")
        if loc:
            name = loc[0]
            params.append("image" if name.startswith("input_image") else PARAMS.get(name, name))
    return "; ".join(parts) or None, next((p for p in params if p), None)
