"""`dashscope`: Alibaba Cloud DashScope (Model Studio) — Qwen-Image generation and instruction edits.

Two upstream endpoints, chosen by the option `mode` (provider-wide, a route may override it):
- `sync`: `POST /api/v1/services/aigc/multimodal-generation/generation`, a chat-shaped body; the
  answer carries the image URLs. Edits always go here (the task endpoint is text-to-image only).
- `async`: `POST /api/v1/services/aigc/text2image/image-synthesis` with `X-DashScope-Async: enable`,
  then `GET /api/v1/tasks/{id}` until the task ends. A task still PENDING when we give up (timeout,
  client gone, an error) is cancelled upstream; DashScope can cancel nothing else.

Image i is always its own call with seed (seed + i) mod 2**31 and n=1: the fixed-size models make one
image per call anyway, and this way image i is reproducible from its seed on every model.
Result URLs are signed OSS links that expire: they are downloaded at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import anyio
import httpx
import pybase64
from pydantic import Field

from . import aio, http
from .base import GeneratedImage, ImageRequest, InputImage, ProviderResult, UpstreamError
from .options import HTTPProviderOptions
from .remote import HTTPProvider

# qwen-image, -plus, -max and their dated snapshots: these sizes only, one image per call.
FIXED_SIZES = frozenset({(1664, 928), (1328, 1328), (928, 1664), (1472, 1140), (1140, 1472),
                         (1472, 1104), (1104, 1472)})
_FIXED_MODEL = re.compile(r"^qwen-image(-plus|-max)?(-\d{4}-\d{2}-\d{2})?$")
MAX_INPUT_IMAGES = 3
SEED_MODULUS = 2**31  # DashScope seeds are 0..2147483647
CANCEL_TIMEOUT_S = 5.0
# Transient poll failures (5xx, 429, a dropped connection) tolerated in a row before giving up.
POLL_MISSES = 3
_TASK_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_WAITING = frozenset({"PENDING", "RUNNING", "SUSPENDED"})
_MODERATION = frozenset({"DataInspectionFailed", "DataInspection", "IPInfringementSuspect"})


class DashScopeOptions(HTTPProviderOptions):
    # With or without `/api/v1`: both forms are accepted.
    base_url: str = "https://dashscope-intl.aliyuncs.com"
    workspace: str = ""  # sent as X-DashScope-WorkSpace when set
    mode: Literal["sync", "async"] = "sync"
    # DashScope's own default is true (an LLM rewrites the prompt, a few seconds more). We send false so
    # the client's prompt is kept as written; a route may set `prompt_extend: true`.
    prompt_extend: bool = False
    watermark: bool = False
    poll_interval_s: float = Field(default=1.0, gt=0)
    poll_max_interval_s: float = Field(default=5.0, gt=0)
    # The result images live on OSS buckets (dashscope-result-*.oss-*.aliyuncs.com).
    download_hosts: list[str] = Field(default_factory=lambda: [".aliyuncs.com"])


def family(model: str) -> str:
    """fixed (qwen-image/-plus/-max), free (qwen-image-2.0*), edit (qwen-image-edit*), or other."""
    if _FIXED_MODEL.match(model):
        return "fixed"
    if model.startswith("qwen-image-2.0"):
        return "free"
    if model.startswith("qwen-image-edit"):
        return "edit"
    return "other"


def _size_problem(kind: str, width: int, height: int) -> str | None:
    if kind == "fixed" and (width, height) not in FIXED_SIZES:
        sizes = ", ".join(f"{w}x{h}" for w, h in sorted(FIXED_SIZES))
        return f"size {width}x{height} is not one of this model's sizes ({sizes})"
    if kind == "free" and not 512 * 512 <= width * height <= 2048 * 2048:
        return f"size {width}x{height} must have between 512x512 and 2048x2048 pixels in all"
    if kind == "edit" and not (512 <= width <= 2048 and 512 <= height <= 2048):
        return f"size {width}x{height}: each side must be between 512 and 2048 pixels"
    return None


def _data_url(image: InputImage) -> str:
    return f"data:{image.content_type};base64,{pybase64.b64encode(image.data).decode('ascii')}"


def _is_quota(code: str) -> bool:
    """Out of money or allocation (not a rate): another account/route may help, waiting will not."""
    if code == "Arrearage" or "AllocationQuota" in code:
        return True
    return code.endswith("Quota") and code != "Throttling.RateQuota"


@dataclass(slots=True)
class _Task:
    id: str
    status: str = "PENDING"
    misses: int = 0


class DashScopeProvider(HTTPProvider):
    kind = "dashscope"
    honours = frozenset({"negative_prompt"})
    capabilities = frozenset({"generate", "edit", "multi-reference"})
    Options = DashScopeOptions
    options: DashScopeOptions

    def __init__(self, name: str, options: DashScopeOptions) -> None:
        super().__init__(name, options)
        self.api = self.base if self.base.endswith("/api/v1") else f"{self.base}/api/v1"

    def auth_headers(self) -> dict[str, str]:
        headers = {"authorization": f"Bearer {self.options.api_key}"}
        if self.options.workspace:
            headers["x-dashscope-workspace"] = self.options.workspace
        return headers

    def unsupported(self, request: ImageRequest) -> str | None:
        kind = family(request.upstream_model)
        if request.mask is not None:
            return "Qwen-Image edits follow the instruction alone; DashScope takes no mask"
        if len(request.images) > MAX_INPUT_IMAGES:
            return f"Qwen-Image edits take at most {MAX_INPUT_IMAGES} input images"
        if request.operation == "edit" and kind == "fixed":
            return f"{request.upstream_model} only generates from text (use qwen-image-edit* or qwen-image-2.0*)"
        if request.operation == "generate" and kind == "edit":
            return f"{request.upstream_model} edits images and needs at least one input image"
        return _size_problem(kind, request.width, request.height)

    # -- settings: provider options, overridden per route ---------------------------------------
    def _setting(self, request: ImageRequest, name: str, allowed: tuple[Any, ...]) -> Any:
        value = request.route_options.get(name, getattr(self.options, name))
        if value not in allowed or type(value) is not type(allowed[0]):
            raise UpstreamError(f"route option {name!r} of provider '{self.name}' must be one of "
                                f"{', '.join(map(str, allowed))}", status=502, code="upstream_misconfigured",
                                fallback=True)
        return value

    def _parameters(self, request: ImageRequest, seed: int) -> dict[str, Any]:
        params: dict[str, Any] = {
            "prompt_extend": self._setting(request, "prompt_extend", (False, True)),
            "watermark": self._setting(request, "watermark", (False, True)),
        }
        params.update(request.extra)  # fields the model's config lets clients pass, these two included
        # …but not the size the gateway checked and bills, nor the one-image-per-call fan-out.
        params.update({"size": f"{request.width}*{request.height}", "n": 1, "seed": seed})
        return params

    # -- generation ------------------------------------------------------------------------------
    async def run(self, request: ImageRequest) -> ProviderResult:
        use_tasks = self._setting(request, "mode", ("sync", "async")) == "async" and request.operation == "generate"
        one = self._from_task if use_tasks else self._from_sync
        images = await aio.gather([partial(self._image, one, request, i) for i in range(request.n)])
        return ProviderResult(images=images)

    async def _image(self, one: Any, request: ImageRequest, i: int) -> GeneratedImage:
        seed = request.seed_for(i) % SEED_MODULUS
        url, revised = await one(request, seed)
        return GeneratedImage(data=await self.download(url), seed=seed, revised_prompt=revised)

    async def _from_sync(self, request: ImageRequest, seed: int) -> tuple[str, str | None]:
        content: list[dict[str, str]] = [{"image": _data_url(image)} for image in request.images]
        content.append({"text": request.prompt})
        params = self._parameters(request, seed)
        if request.negative_prompt:
            params["negative_prompt"] = request.negative_prompt
        body = {"model": request.upstream_model,
                "input": {"messages": [{"role": "user", "content": content}]}, "parameters": params}
        answer = await self.call("POST", f"{self.api}/services/aigc/multimodal-generation/generation", json=body)
        return self._sync_image(self._output(answer))

    def _sync_image(self, output: dict[str, Any]) -> tuple[str, str | None]:
        choices = output.get("choices")
        if not isinstance(choices, list) or not choices:
            raise http.bad_response("upstream answer has no choices")
        for choice in choices:
            message = choice.get("message") if isinstance(choice, dict) else None
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, list):
                raise http.bad_response("upstream choice has no message content")
            items = [item for item in content if isinstance(item, dict)]
            # A rewritten prompt (prompt_extend) comes as `actual_prompt` or as a text item beside the image.
            texts = [item["text"] for item in items if isinstance(item.get("text"), str)]
            for item in items:
                if "image" in item:
                    revised = item.get("actual_prompt") if isinstance(item.get("actual_prompt"), str) else None
                    return _url(item["image"]), revised or (texts[0] if texts else None)
        raise http.bad_response("upstream answer has no image")

    async def _from_task(self, request: ImageRequest, seed: int) -> tuple[str, str | None]:
        prompt: dict[str, str] = {"prompt": request.prompt}
        if request.negative_prompt:
            prompt["negative_prompt"] = request.negative_prompt
        body = {"model": request.upstream_model, "input": prompt, "parameters": self._parameters(request, seed)}
        answer = await self.call("POST", f"{self.api}/services/aigc/text2image/image-synthesis", json=body,
                                 headers={"x-dashscope-async": "enable"})
        output = self._output(answer)
        if not isinstance(output.get("task_id"), str) or not _TASK_ID.match(output["task_id"]):
            raise http.bad_response("upstream answer has no usable task id")  # it goes into our URLs
        task = _Task(output["task_id"], str(output.get("task_status") or "PENDING"))
        try:
            done = await aio.poll(partial(self._check, task), interval_s=self.options.poll_interval_s,
                                  max_interval_s=self.options.poll_max_interval_s)
        except BaseException:  # cancelled (deadline, client gone) or failed: nobody will collect it
            if task.status == "PENDING":
                await self._cancel(task.id)
            raise
        return self._task_image(done)

    async def _check(self, task: _Task) -> dict[str, Any] | None:
        try:
            output = self._output(await self.call("GET", f"{self.api}/tasks/{task.id}"))
        except UpstreamError as exc:
            # The SDK also retries its status reads: one lost poll is no reason to lose the task.
            task.misses += 1
            if exc.retryable and task.misses < POLL_MISSES:
                return None
            raise
        task.misses, task.status = 0, str(output.get("task_status"))
        if task.status in _WAITING:
            return None
        if task.status == "SUCCEEDED":
            return output
        if task.status == "FAILED":
            raise self._mapped(output.get("code"), output.get("message"), None)
        if task.status == "CANCELED":
            raise UpstreamError("the upstream task was canceled", status=502, code="upstream_error", fallback=True)
        if task.status == "UNKNOWN":
            raise UpstreamError("the upstream no longer knows the task (expired or invalid id)", status=502,
                                code="upstream_error", retryable=True)
        raise http.bad_response(f"upstream task has an unknown status: {self.clean(task.status, 40)}")

    def _task_image(self, output: dict[str, Any]) -> tuple[str, str | None]:
        results = output.get("results")
        if not isinstance(results, list) or not results:
            raise http.bad_response("upstream task succeeded without results")
        failed: dict[str, Any] | None = None
        for item in results:
            if isinstance(item, dict) and "url" in item:
                revised = item.get("actual_prompt")
                return _url(item["url"]), revised if isinstance(revised, str) else None
            if isinstance(item, dict) and item.get("code"):
                failed = item  # a failed image of the task: {code, message}
        if failed is not None:
            raise self._mapped(failed.get("code"), failed.get("message"), None)
        raise http.bad_response("upstream task results carry no image URL")

    async def _cancel(self, task_id: str) -> None:
        """Cancel a PENDING task, shielded from our own cancellation; a refusal (it started) is fine."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_TIMEOUT_S):
            try:
                await self.client.post(f"{self.api}/tasks/{task_id}/cancel", timeout=CANCEL_TIMEOUT_S)
            except httpx.HTTPError:
                pass

    # -- answers and errors ------------------------------------------------------------------------
    def _output(self, answer: Any) -> dict[str, Any]:
        if isinstance(answer, dict) and isinstance(output := answer.get("output"), dict):
            return output
        if isinstance(answer, dict) and isinstance(answer.get("code"), str) and answer["code"]:
            raise self._mapped(answer["code"], answer.get("message"), None)  # an error body sent with a 200
        raise http.bad_response("upstream answer has no output")

    def error(self, response: httpx.Response) -> UpstreamError:
        code, message = None, f"HTTP {response.status_code}"
        try:
            body = http.parse_json(response)
            if isinstance(body, dict):
                code = body.get("code")
                message = str(body.get("message") or body.get("msg") or message)
        except UpstreamError:
            pass
        return self._mapped(code, message, response.status_code, http.retry_after_seconds(response))

    def _mapped(self, code: Any, message: Any, status: int | None, retry_after: float | None = None) -> UpstreamError:
        """A DashScope error code (an HTTP error's, or a failed task's with no status) as the client sees it."""
        code = str(code or "")
        text = self.clean(f"{code}: {message}" if code else message)
        if code in _MODERATION:
            return UpstreamError(f"the upstream refused the request: {text}", status=400,
                                 code="content_policy_violation")
        if _is_quota(code):
            return UpstreamError(f"the upstream account is out of quota: {text}", status=502,
                                 code="upstream_quota_exceeded", fallback=True)
        if code.startswith("Throttling"):
            return http.error_for_status(429, text, retry_after=retry_after)
        if code == "InvalidApiKey":
            return http.error_for_status(401, text)
        if code.startswith("InvalidParameter"):
            return http.error_for_status(400, text)
        if code.startswith("InternalError") or status is None:
            # A failed task has no HTTP status: unless its code says otherwise, an upstream fault.
            return http.error_for_status(max(status or 500, 500), text, retry_after=retry_after)
        return http.error_for_status(status, text, retry_after=retry_after)


def _url(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith(("https://", "http://")):
        raise http.bad_response("upstream image item is not a URL")
    return value
