"""`openai`: any OpenAI-compatible Images API, including other imagegate gateways and workers.

Generations go out as JSON, edits as multipart exactly as the official SDK sends them. The
gateway's own extension fields (seed, steps, …) are sent as extra top-level fields unless
`pass_extensions: false` (the real OpenAI API rejects unknown fields).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import httpx

from . import aio, http
from .base import GeneratedImage, ImageRequest, ProviderResult, UpstreamError
from .options import HTTPProviderOptions
from .remote import HTTPProvider

_MODERATION_CODES = {"content_policy_violation", "moderation_blocked"}


class OpenAIOptions(HTTPProviderOptions):
    base_url: str = "https://api.openai.com/v1"
    organization: str = ""
    # None: ask nothing and accept either shape (gpt-image models refuse the field).
    response_format: Literal["b64_json", "url"] | None = None
    pass_extensions: bool = True


class OpenAIProvider(HTTPProvider):
    kind = "openai"
    capabilities = frozenset({"generate", "edit", "inpaint", "multi-reference", "transparent"})
    Options = OpenAIOptions
    options: OpenAIOptions
    # Local OpenAI-compatible servers (an `imagegate worker`, say) often take no key at all.
    requires_api_key = False

    def auth_headers(self) -> dict[str, str]:
        headers = {}
        if self.options.api_key:
            headers["authorization"] = f"Bearer {self.options.api_key}"
        if self.options.organization:
            headers["openai-organization"] = self.options.organization
        return headers

    def _fields(self, request: ImageRequest) -> dict[str, Any]:
        # Pass-through fields (models with allow_extra_fields) first: never over what the gateway set.
        fields: dict[str, Any] = {**(request.extra if self.options.pass_extensions else {}),
                                  "model": request.upstream_model, "prompt": request.prompt, "n": request.n,
                                  "size": request.size, "output_format": request.output_format}
        optional = {"quality": request.quality, "background": request.background,
                    "output_compression": request.output_compression,
                    "response_format": self.options.response_format, **request.hints}
        fields.update({k: v for k, v in optional.items() if v is not None})
        if self.options.pass_extensions:
            ext = {"seed": request.seed, "steps": request.steps, "guidance_scale": request.guidance_scale,
                   "negative_prompt": request.negative_prompt, "strength": request.strength}
            fields.update({k: v for k, v in ext.items() if v is not None})
        return fields

    async def run(self, request: ImageRequest) -> ProviderResult:
        fields = self._fields(request)
        if request.operation == "generate":
            body, b64s = await self.call_images("POST", f"{self.base}/images/generations", json=fields)
        else:
            body, b64s = await self.call_images("POST", f"{self.base}/images/edits", data=_form(fields),
                                                files=_files(request))
        items = body.get("data") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items:
            raise http.bad_response("upstream answer has no images")
        cut = [isinstance(item, dict) and item.get("b64_json") == "" for item in items]
        if sum(cut) != len(b64s):
            raise http.bad_response("upstream answer is not an images answer")
        views = iter(b64s)
        images = await aio.gather([partial(self._materialize, i, item, request, next(views) if cut[i] else None)
                                   for i, item in enumerate(items)])
        return ProviderResult(images=images, metadata={"upstream_created": body.get("created")})

    async def _materialize(self, i: int, item: Any, request: ImageRequest, b64: memoryview | None) -> GeneratedImage:
        if not isinstance(item, dict):
            raise http.bad_response("upstream image entry is not an object")
        seed = item.get("seed") if isinstance(item.get("seed"), int) else request.seed_for(i)
        if b64 is not None or item.get("b64_json"):
            image = http.decode_b64_image(b64 if b64 is not None else item["b64_json"], seed=seed)
        elif isinstance(item.get("url"), str):
            image = GeneratedImage(data=await self.download(item["url"]), seed=seed)
        else:
            raise http.bad_response("upstream image entry has neither b64_json nor url")
        if isinstance(item.get("revised_prompt"), str):
            image.revised_prompt = item["revised_prompt"]
        return image

    def error(self, response: httpx.Response) -> UpstreamError:
        message, code, param = f"HTTP {response.status_code}", None, None
        try:
            err = http.parse_json(response).get("error")
            if isinstance(err, dict):
                message = str(err.get("message") or message)
                code, param = err.get("code"), err.get("param")
            elif isinstance(err, str):
                message = err
        except (UpstreamError, AttributeError):
            pass
        message = self.clean(message)
        if response.status_code == 400 and code in _MODERATION_CODES:
            return UpstreamError(f"the upstream refused the request: {message}", status=400,
                                 code="content_policy_violation")
        if response.status_code == 429 and code == "insufficient_quota":
            # OpenAI's "out of credit" is a 429 too, but waiting does not end it: fall back, don't retry,
            # and let the circuit breaker count it.
            return UpstreamError(f"the upstream account is out of quota: {message}", status=502,
                                 code="upstream_quota_exceeded", fallback=True)
        error = http.error_for_status(response.status_code, message,
                                      retry_after=http.retry_after_seconds(response))
        if error.status == 400 and isinstance(param, str):
            error.param = param
        return error


def _form(fields: dict[str, Any]) -> dict[str, str]:
    """Multipart text fields as the SDK writes them: booleans lower-case, None omitted."""
    out: dict[str, str] = {}
    for key, value in fields.items():
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif value is not None:
            out[key] = str(value)
    return out


def _files(request: ImageRequest) -> list[tuple[str, tuple[str, bytes, str]]]:
    name = "image" if len(request.images) == 1 else "image[]"
    files = [(name, (f"image{i}.{img.format}", img.data, img.content_type)) for i, img in enumerate(request.images)]
    if request.mask is not None:
        files.append(("mask", (f"mask.{request.mask.format}", request.mask.data, request.mask.content_type)))
    return files
