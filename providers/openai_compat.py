"""`openai`: any OpenAI-compatible Images API, including other imagegate gateways and workers.

Generations go out as JSON, edits as multipart exactly as the official SDK sends them. The
gateway's own extension fields (seed, steps, …) are sent as extra top-level fields unless
`pass_extensions: false` (the real OpenAI API rejects unknown fields).
"""

from __future__ import annotations

from typing import Any, Literal

import anyio
import httpx

from . import http
from .base import GeneratedImage, ImageRequest, Provider, ProviderResult, UpstreamError
from .options import HTTPProviderOptions

_MODERATION_CODES = {"content_policy_violation", "moderation_blocked"}


class OpenAIOptions(HTTPProviderOptions):
    base_url: str = "https://api.openai.com/v1"
    organization: str = ""
    # None: ask nothing and accept either shape (gpt-image models refuse the field).
    response_format: Literal["b64_json", "url"] | None = None
    pass_extensions: bool = True


class OpenAIProvider(Provider):
    kind = "openai"
    capabilities = frozenset({"generate", "edit", "inpaint", "multi-reference", "transparent"})
    Options = OpenAIOptions
    options: OpenAIOptions

    def __init__(self, name: str, options: OpenAIOptions) -> None:
        super().__init__(name, options)
        self._client: httpx.AsyncClient | None = None
        self._downloads: httpx.AsyncClient | None = None
        self._base = options.base_url.rstrip("/")

    def secrets(self) -> list[str]:
        return [self.options.api_key]

    async def start(self) -> None:
        headers = {"accept": "application/json"}
        if self.options.api_key:
            headers["authorization"] = f"Bearer {self.options.api_key}"
        if self.options.organization:
            headers["openai-organization"] = self.options.organization
        self._client = http.make_client(self.options, headers)
        self._downloads = http.make_client(self.options, {})

    async def aclose(self) -> None:
        for client in (self._client, self._downloads):
            if client is not None:
                await client.aclose()

    def _fields(self, request: ImageRequest) -> dict[str, Any]:
        fields: dict[str, Any] = {"model": request.upstream_model, "prompt": request.prompt, "n": request.n,
                                  "size": request.size, "output_format": request.output_format}
        optional = {"quality": request.quality, "background": request.background,
                    "output_compression": request.output_compression,
                    "response_format": self.options.response_format, **request.hints}
        fields.update({k: v for k, v in optional.items() if v is not None})
        if self.options.pass_extensions:
            ext = {"seed": request.seed, "steps": request.steps, "guidance_scale": request.guidance_scale,
                   "negative_prompt": request.negative_prompt, "strength": request.strength}
            fields.update({k: v for k, v in ext.items() if v is not None})
            fields.update(request.extra)
        return fields

    async def generate(self, request: ImageRequest) -> ProviderResult:
        assert self._client is not None, "provider not started"
        fields = self._fields(request)
        try:
            if request.operation == "generate":
                resp = await self._client.post(f"{self._base}/images/generations", json=fields)
            else:
                resp = await self._client.post(f"{self._base}/images/edits", data=_form(fields),
                                               files=_files(request))
        except httpx.HTTPError as exc:
            raise http.transport_error(exc) from None
        if resp.status_code != 200:
            raise self._error(resp)
        body = http.parse_json(resp)
        items = body.get("data") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items:
            raise http.bad_response("upstream answer has no images")
        images = await self._materialize(items, request)
        return ProviderResult(images=images, metadata={"upstream_created": body.get("created")})

    async def _materialize(self, items: list[Any], request: ImageRequest) -> list[GeneratedImage]:
        images: list[GeneratedImage | None] = [None] * len(items)

        async def one(i: int, item: Any) -> None:
            if not isinstance(item, dict):
                raise http.bad_response("upstream image entry is not an object")
            seed = item.get("seed") if isinstance(item.get("seed"), int) else request.seed_for(i)
            if item.get("b64_json"):
                image = http.decode_b64_image(item["b64_json"], seed=seed)
            elif isinstance(item.get("url"), str):
                data = await self._download(item["url"])
                image = GeneratedImage(data=data, seed=seed)
            else:
                raise http.bad_response("upstream image entry has neither b64_json nor url")
            if isinstance(item.get("revised_prompt"), str):
                image.revised_prompt = item["revised_prompt"]
            images[i] = image

        try:
            async with anyio.create_task_group() as tg:
                for i, item in enumerate(items):
                    tg.start_soon(one, i, item)
        except* UpstreamError as group:
            # A task group wraps what its tasks raise; the router expects the UpstreamError itself.
            raise group.exceptions[0] from None
        return [img for img in images if img is not None]

    async def _download(self, url: str) -> bytes:
        assert self._downloads is not None
        hosts = [http.base_host(self._base), *self.options.download_hosts]
        return await http.download(self._downloads, url, allowed_hosts=hosts,
                                   max_bytes=int(self.options.max_download_mb * 1024 * 1024),
                                   timeout_s=self.options.download_timeout_s)

    def _error(self, resp: httpx.Response) -> UpstreamError:
        message, code, param = f"HTTP {resp.status_code}", None, None
        try:
            err = http.parse_json(resp).get("error")
            if isinstance(err, dict):
                message = str(err.get("message") or message)[:500]
                code, param = err.get("code"), err.get("param")
            elif isinstance(err, str):
                message = err[:500]
        except (UpstreamError, AttributeError):
            pass
        message = http.redact(message, self.secrets())
        if resp.status_code == 400 and code in _MODERATION_CODES:
            return UpstreamError(f"the upstream refused the request: {message}", status=400,
                                 code="content_policy_violation")
        error = http.error_for_status(resp.status_code, message, retry_after=http.retry_after_seconds(resp))
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
