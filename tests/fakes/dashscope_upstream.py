"""A fake DashScope (Alibaba Cloud Model Studio) Qwen-Image API, as documented.

- `POST /api/v1/services/aigc/multimodal-generation/generation`: synchronous; chat-shaped input
  (`input.messages[0].content` = up to 3 `{"image"}` items and one `{"text"}`), answers
  `output.choices[].message.content[].image` URLs.
- `POST /api/v1/services/aigc/text2image/image-synthesis`: needs `X-DashScope-Async: enable`
  (else 403 AccessDenied, as the real one); answers `output.task_id`, `task_status: PENDING`.
- `GET /api/v1/tasks/{id}`: PENDING (`pending_polls` reads), RUNNING (`running_polls` reads), then
  SUCCEEDED (`output.results[].url`) or whatever `behave(task=...)` said; an unknown id is UNKNOWN.
- `POST /api/v1/tasks/{id}/cancel`: only a PENDING task can be canceled.
- `GET /oss/{name}.png?Expires=…&OSSAccessKeyId=…&Signature=…`: result images, real PNGs of the
  asked `W*H`, behind signed expiring URLs (403 with OSS's XML once expired or tampered with).

Auth is `Authorization: Bearer <key>`; errors are `{"request_id", "code", "message"}`. Parameters are
validated as the real service does (size `W*H` from the model's set or range, n, seed, lengths).
With `prompt_extend` on (the upstream default), results carry `orig_prompt`/`actual_prompt` (async,
documented) and the sync answer a `{"text": actual_prompt}` item beside the image (an assumption).
`behave(...)` makes it misbehave; every authorized request is recorded.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import io
import re
import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import orjson
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .server import FakeUpstream

API = "/api/v1"
SYNC_PATH = f"{API}/services/aigc/multimodal-generation/generation"
ASYNC_PATH = f"{API}/services/aigc/text2image/image-synthesis"
FIXED_SIZES = {"1664*928", "1328*1328", "928*1664", "1472*1140", "1140*1472", "1472*1104", "1104*1472"}
ASYNC_MODELS = re.compile(r"^qwen-image(-plus)?(-\d{4}-\d{2}-\d{2})?$")
FIXED_MODELS = re.compile(r"^qwen-image(-plus|-max)?(-\d{4}-\d{2}-\d{2})?$")
_SIZE = re.compile(r"^(\d+)\*(\d+)$")
_DATA_URL = re.compile(r"^data:image/(png|jpeg|jpg|webp);base64,(.+)$", re.S)

# Real DashScope codes, statuses and messages.
ERRORS: dict[str, tuple[int, str]] = {
    "InvalidApiKey": (401, "Invalid API-key provided."),
    "InvalidParameter": (400, "The request parameter is invalid."),
    "DataInspectionFailed": (400, "Input data may contain inappropriate content."),
    "Throttling": (429, "Requests throttling triggered."),
    "Throttling.RateQuota": (429, "Requests rate limit exceeded, please try again later."),
    "Throttling.AllocationQuota": (429, "Allocated quota exceeded, please increase your quota limit."),
    "Arrearage": (400, "Access denied, please make sure your account is in good standing."),
    "InternalError": (500, "An internal error has occured, please try again later or contact service support."),
}


class Invalid(Exception):
    """A request the real service refuses with 400 InvalidParameter."""


@lru_cache(maxsize=64)
def png(width: int, height: int, seed: int) -> bytes:
    color = ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256)
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    json: Any = None


@dataclass
class Task:
    id: str
    outcome: str  # succeed | failed | item_failed | unknown | never
    code: str
    images: list[dict[str, Any]]
    status: str = "PENDING"
    polls: int = 0
    submitted: float = field(default_factory=time.time)


class FakeDashScope(FakeUpstream):
    def __init__(self, api_key: str = "sk-upstream-secret-123") -> None:
        self.api_key = api_key
        self.requests: list[Recorded] = []
        self.tasks: dict[str, Task] = {}
        self.cancels: list[str] = []  # every cancel asked for (also refused ones)
        self.files: dict[str, bytes] = {}
        self._sign_key = uuid.uuid4().bytes
        self.behave()
        self.app = Starlette(routes=[
            Route(SYNC_PATH, self._sync, methods=["POST"]),
            Route(ASYNC_PATH, self._submit, methods=["POST"]),
            Route(f"{API}/tasks/{{task_id}}", self._task, methods=["GET"]),
            Route(f"{API}/tasks/{{task_id}}/cancel", self._cancel, methods=["POST"]),
            Route("/oss/{name}", self._oss, methods=["GET"]),
        ])

    # -- control ---------------------------------------------------------------------------------
    def behave(self, *, error: str | None = None, status: int | None = None, fail_on: str = "submit",
               fail_times: int = 1_000_000, retry_after: str | None = None, delay_s: float = 0.0,
               mode: str = "url", task: str = "succeed", task_code: str = "InternalError",
               pending_polls: int = 1, running_polls: int = 1) -> None:
        """error: a code of ERRORS (status overrides its HTTP status) answered on `fail_on` calls
        (submit | poll), `fail_times` times. mode: url | garbage (not JSON) | no_output | no_choices |
        not_url | expired_url | foreign_url. task: succeed | failed (output.code = task_code) |
        item_failed (SUCCEEDED, its result item failed with task_code) | unknown | never (stays PENDING)."""
        self.error, self.status, self.fail_on, self.fail_times = error, status, fail_on, fail_times
        self.retry_after, self.delay_s, self.mode = retry_after, delay_s, mode
        self.task_outcome, self.task_code = task, task_code
        self.pending_polls, self.running_polls = pending_polls, running_polls

    def submits(self) -> list[Recorded]:
        """The generation calls received (both endpoints), in order."""
        return [r for r in self.requests if r.path in (SYNC_PATH, ASYNC_PATH)]

    # -- shared ------------------------------------------------------------------------------------
    @staticmethod
    def _error(code: str, message: str | None = None, status: int | None = None,
               headers: dict[str, str] | None = None) -> Response:
        default_status, default_message = ERRORS.get(code, (400, code))
        body = {"request_id": str(uuid.uuid4()), "code": code, "message": message or default_message}
        return JSONResponse(body, status_code=status or default_status, headers=headers)

    def _denied(self, request: Request) -> Response | None:
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return self._error("InvalidApiKey")
        return None

    async def _record(self, request: Request) -> tuple[Recorded, Any]:
        raw = await request.body()
        try:
            parsed = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            parsed = None
        rec = Recorded(request.method, request.url.path, dict(request.headers), parsed)
        self.requests.append(rec)
        return rec, parsed

    async def _misbehave(self, where: str) -> Response | None:
        if where == "submit" and self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.error and self.fail_on == where and self.fail_times > 0:
            self.fail_times -= 1
            headers = {"retry-after": self.retry_after} if self.retry_after else None
            return self._error(self.error, status=self.status, headers=headers)
        return None

    def _image_url(self, width: int, height: int, seed: int) -> str:
        if self.mode == "not_url":
            return base64.b64encode(png(width, height, seed)).decode()
        name = f"{uuid.uuid4().hex}.png"
        self.files[name] = png(width, height, seed)
        expires = int(time.time()) + (-60 if self.mode == "expired_url" else 86400)
        host = "http://evil.invalid" if self.mode == "foreign_url" else self.url
        return f"{host}/oss/{name}?Expires={expires}&OSSAccessKeyId=LTAI5tFake&Signature={self._sign(name, expires)}"

    def _sign(self, name: str, expires: int) -> str:
        digest = hmac.new(self._sign_key, f"{name}\n{expires}".encode(), hashlib.sha1).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def _answer(self, body: dict[str, Any]) -> Response:
        if self.mode == "garbage":
            return Response(b"<html><body>502 Bad Gateway</body></html>", status_code=200, media_type="text/html")
        if self.mode == "no_output":
            body = {k: v for k, v in body.items() if k != "output"}
        return JSONResponse(body)

    # -- validation ---------------------------------------------------------------------------------
    @staticmethod
    def _parameters(model: str, params: Any, *, edit: bool) -> tuple[int, int, int, int]:
        """(width, height, n, seed) or Invalid, as the real service checks them."""
        if not isinstance(params, dict):
            params = {}
        size = params.get("size", "1328*1328" if FIXED_MODELS.match(model) else "1024*1024")
        match = _SIZE.match(size) if isinstance(size, str) else None
        if not match:
            raise Invalid("The size is invalid, please use the format of width*height, such as 1024*1024.")
        width, height = int(match[1]), int(match[2])
        if FIXED_MODELS.match(model) and size not in FIXED_SIZES:
            raise Invalid(f"The size {size} is not supported by the model {model}.")
        if model.startswith("qwen-image-2.0") and not 512 * 512 <= width * height <= 2048 * 2048:
            raise Invalid("The total pixels of size must be between 512*512 and 2048*2048.")
        if edit and not (512 <= width <= 2048 and 512 <= height <= 2048):
            raise Invalid("The width and height of size must be between 512 and 2048.")
        n = params.get("n", 1)
        max_n = 1 if FIXED_MODELS.match(model) else 6
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= max_n:
            raise Invalid(f"The n must be an integer between 1 and {max_n}.")
        seed = params.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= 2147483647:
            raise Invalid("The seed must be an integer between 0 and 2147483647.")
        for flag in ("prompt_extend", "watermark"):
            if flag in params and not isinstance(params[flag], bool):
                raise Invalid(f"The {flag} must be a boolean.")
        if len(str(params.get("negative_prompt", ""))) > 500:
            raise Invalid("The negative_prompt is too long (500 characters at most).")
        return width, height, n, seed

    @staticmethod
    def _content(model: str, body: dict[str, Any]) -> tuple[str, list[bytes]]:
        """The prompt and the input image bytes of a sync request, or Invalid."""
        messages = (body.get("input") or {}).get("messages") if isinstance(body.get("input"), dict) else None
        if not isinstance(messages, list) or len(messages) != 1 or not isinstance(messages[0], dict) \
                or messages[0].get("role") != "user" or not isinstance(messages[0].get("content"), list):
            raise Invalid("The input.messages must be one user message with a content list.")
        texts, images = [], []
        for item in messages[0]["content"]:
            if isinstance(item, dict) and isinstance(item.get("text"), str):
                texts.append(item["text"])
            elif isinstance(item, dict) and isinstance(item.get("image"), str):
                match = _DATA_URL.match(item["image"])
                if not match:
                    raise Invalid("The image must be a public URL or a base64 data URL.")
                try:
                    images.append(base64.b64decode(match[2], validate=True))
                except binascii.Error:
                    raise Invalid("The image data is not valid base64.") from None
            else:
                raise Invalid("Each content item must be {\"text\"} or {\"image\"}.")
        if len(texts) != 1 or not texts[0].strip():
            raise Invalid("The content must hold exactly one non-empty text item.")
        if len(images) > 3:
            raise Invalid("At most 3 input images are supported.")
        if images and FIXED_MODELS.match(model):
            raise Invalid(f"The model {model} does not accept input images.")
        if not images and model.startswith("qwen-image-edit"):
            raise Invalid(f"The model {model} needs at least one input image.")
        return texts[0], images

    # -- handlers -------------------------------------------------------------------------------------
    async def _sync(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        _, body = await self._record(request)
        if (bad := await self._misbehave("submit")) is not None:
            return bad
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return self._error("InvalidParameter", "Model not exist.")
        model = body["model"]
        try:
            prompt, images = self._content(model, body)
            width, height, n, seed = self._parameters(model, body.get("parameters"), edit=bool(images))
        except Invalid as exc:
            return self._error("InvalidParameter", str(exc))
        params = body.get("parameters") or {}
        content: list[dict[str, Any]] = [{"image": self._image_url(width, height, seed + i)} for i in range(n)]
        if params.get("prompt_extend", True):
            content.append({"text": f"{prompt}, rewritten in rich detail"})
        output: dict[str, Any] = {"choices": [{"finish_reason": "stop",
                                               "message": {"role": "assistant", "content": content}}]}
        if self.mode == "no_choices":
            output = {"finish_reason": "stop"}
        return self._answer({"output": output, "usage": {"width": width, "height": height, "image_count": n},
                             "request_id": str(uuid.uuid4())})

    async def _submit(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        _, body = await self._record(request)
        if request.headers.get("x-dashscope-async") != "enable":
            return self._error("AccessDenied", "current user api does not support synchronous calls", 403)
        if (bad := await self._misbehave("submit")) is not None:
            return bad
        if not isinstance(body, dict) or not ASYNC_MODELS.match(str(body.get("model"))):
            return self._error("InvalidParameter", "Model not exist.")
        prompt = (body.get("input") or {}).get("prompt") if isinstance(body.get("input"), dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            return self._error("InvalidParameter", "The input.prompt is required.")
        try:
            width, height, n, seed = self._parameters(body["model"], body.get("parameters"), edit=False)
        except Invalid as exc:
            return self._error("InvalidParameter", str(exc))
        extend = (body.get("parameters") or {}).get("prompt_extend", True)
        images = []
        for i in range(n):
            item: dict[str, Any] = {"url": self._image_url(width, height, seed + i)}
            if extend:
                item.update(orig_prompt=prompt, actual_prompt=f"{prompt}, rewritten in rich detail")
            images.append(item)
        task = Task(str(uuid.uuid4()), self.task_outcome, self.task_code, images)
        self.tasks[task.id] = task
        return self._answer({"output": {"task_id": task.id, "task_status": "PENDING"},
                             "request_id": str(uuid.uuid4())})

    def _advance(self, task: Task) -> None:
        if task.status not in ("PENDING", "RUNNING"):
            return
        task.polls += 1
        if task.outcome == "never" or task.polls <= self.pending_polls:
            return
        task.status = "RUNNING"
        if task.polls <= self.pending_polls + self.running_polls:
            return
        task.status = {"failed": "FAILED", "unknown": "UNKNOWN"}.get(task.outcome, "SUCCEEDED")

    async def _task(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        await self._record(request)
        if (bad := await self._misbehave("poll")) is not None:
            return bad
        task_id = request.path_params["task_id"]
        task = self.tasks.get(task_id)
        if task is not None:
            self._advance(task)
        status = task.status if task is not None else "UNKNOWN"
        output: dict[str, Any] = {"task_id": task_id, "task_status": status}
        if task is not None and status == "SUCCEEDED":
            results = task.images
            if task.outcome == "item_failed":
                results = [{"code": task.code, "message": ERRORS.get(task.code, (0, task.code))[1]}]
            output["results"] = [] if self.mode == "no_choices" else results
            failed = sum(1 for r in results if "code" in r)
            output["task_metrics"] = {"TOTAL": len(results), "SUCCEEDED": len(results) - failed, "FAILED": failed}
        elif task is not None and status == "FAILED":
            output.update(code=task.code, message=ERRORS.get(task.code, (0, task.code))[1])
        return self._answer({"request_id": str(uuid.uuid4()), "output": output,
                             "usage": {"image_count": len(task.images) if task else 0}})

    async def _cancel(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        await self._record(request)
        task_id = request.path_params["task_id"]
        self.cancels.append(task_id)
        task = self.tasks.get(task_id)
        if task is None or task.status != "PENDING":
            return self._error("UnsupportedOperation",
                               "Failed to cancel the task, please confirm if the task is in PENDING status.", 400)
        task.status = "CANCELED"
        return JSONResponse({"request_id": str(uuid.uuid4())})

    async def _oss(self, request: Request) -> Response:
        name = request.path_params["name"]
        try:
            expires = int(request.query_params.get("Expires", ""))
        except ValueError:
            expires = 0
        good = hmac.compare_digest(request.query_params.get("Signature", ""), self._sign(name, expires))
        if not good or expires < time.time() or name not in self.files:
            message = "Request has expired." if good else "The request signature we calculated does not match."
            xml = f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>AccessDenied</Code>" \
                  f"<Message>{message}</Message></Error>"
            return Response(xml.encode(), status_code=403, media_type="application/xml")
        return Response(self.files[name], media_type="image/png")
