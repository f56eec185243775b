"""A fake Black Forest Labs API: `POST /v1/<model>`, `GET /v1/get_result?id=…`, signed delivery URLs.

It follows the documented API (docs/providers.md §3): `x-key` auth (401 `{"detail": "Not authenticated"}`),
per-family request validation with FastAPI 422 bodies, `{id, polling_url, cost, input_mp, output_mp}`
answers, tasks that stay `Pending` for some polls and then end `Ready` with `result.sample`, a signed
URL that expires (403 with an Azure-style XML body, as BFL's delivery storage answers). Images are real
JPEG/PNG of the asked size (FLUX.2/FLUX.1), of the input's size (Fill), or about 1 MP of the asked
aspect ratio (ultra/Kontext). Everything is recorded; `behave(...)` makes it misbehave.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import math
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .openai_upstream import Recorded, solid_image
from .server import FakeUpstream

COMMON = {"prompt", "seed", "safety_tolerance", "output_format", "webhook_url", "webhook_secret"}
FLUX2_IMAGES = ["input_image"] + [f"input_image_{i}" for i in range(2, 9)]
FIELDS = {
    "flux2": COMMON | {"width", "height", "prompt_upsampling", *FLUX2_IMAGES},
    "flux1": COMMON | {"width", "height", "prompt_upsampling", "image_prompt"},
    "ultra": COMMON | {"aspect_ratio", "prompt_upsampling", "raw", "image_prompt", "image_prompt_strength"},
    "kontext": COMMON | {"aspect_ratio", "prompt_upsampling", *FLUX2_IMAGES[:4]},
    "fill": COMMON | {"image", "mask", "steps", "guidance", "prompt_upsampling"},
}
# Models that take steps/guidance besides Fill (flux-pro also `interval`).
TUNED = {"flux-2-flex": {"steps", "guidance"}, "flux-pro": {"steps", "guidance", "interval"},
         "flux-dev": {"steps", "guidance"}}
MODELS = {"flux-2-pro": "flux2", "flux-2-max": "flux2", "flux-2-flex": "flux2", "flux-2-klein-4b": "flux2",
          "flux-2-klein-9b": "flux2", "flux-pro-1.1": "flux1", "flux-pro": "flux1", "flux-dev": "flux1",
          "flux-pro-1.1-ultra": "ultra", "flux-kontext-pro": "kontext", "flux-kontext-max": "kontext",
          "flux-pro-1.0-fill": "fill", "flux-fill": "fill"}
_RATIO = re.compile(r"^(\d+):(\d+)$")
OUTCOMES = {"ready", "request_moderated", "content_moderated", "error", "not_found", "never", "no_sample",
            "garbage", "no_status"}


@dataclass
class Task:
    id: str
    model: str
    body: dict[str, Any]
    polls: int = 0


@dataclass
class Behaviour:
    delay_s: float = 0.0                      # before answering a submit
    fail_status: int | None = None            # submit answers this (5xx, 429, 402, 403, 422 …)
    fail_times: int = 1_000_000
    error_body: Any = None
    retry_after: str | None = None
    submit: str = "ok"                        # ok | garbage (not JSON) | missing_fields
    pending_polls: int = 1                    # polls answered Pending before the outcome
    outcome: str = "ready"                    # one of OUTCOMES
    poll_fail_status: int | None = None       # a poll answers this with a non-JSON body
    poll_fail_times: int = 1_000_000
    pending_http: int = 200                   # BFL has answered Pending with 202
    terminal_http: int = 200                  # … and terminal states with 503
    polling_host: str | None = None           # host name in polling_url (None: the one we listen on)
    sample_host: str | None = None
    sample_ttl_s: float = 600.0               # BFL: signed URLs are valid for 10 minutes
    sample_max_downloads: int | None = None
    sample_not_image: bool = False
    seed_shift: int = 0                       # result.seed = sent seed + shift
    report_seed: bool = True
    details: Any = None                       # `details` of a moderated/failed task
    pending_status: str = "Pending"           # e.g. a state the adapter does not know yet


class FakeBFL(FakeUpstream):
    def __init__(self, api_key: str = "bfl_fake-upstream-key-123") -> None:
        self.api_key = api_key
        self.behaviour = Behaviour()
        self.submits: list[Recorded] = []  # authorized ones (a wrong key is refused before)
        self.polls: list[Recorded] = []  # every one, with its headers: where did the key go?
        self.downloads: list[Recorded] = []
        self.tasks: dict[str, Task] = {}
        self.samples: dict[str, tuple[bytes, str, float]] = {}  # token → (bytes, content type, expiry)
        self.sample_downloads: dict[str, int] = {}
        self.app = Starlette(routes=[
            Route("/v1/get_result", self._get_result, methods=["GET"]),
            Route("/v1/{model}", self._submit, methods=["POST"]),
            Route("/results/{token}/sample.{ext}", self._delivery, methods=["GET"]),
        ])

    # -- control -------------------------------------------------------------------------------
    def behave(self, **changes: Any) -> None:
        """Reset to a well-behaved upstream, then apply `changes` (fields of Behaviour)."""
        outcome = changes.get("outcome", "ready")
        assert outcome in OUTCOMES, outcome
        self.behaviour = Behaviour(**changes)

    def reset(self) -> None:
        self.behave()
        for log in (self.submits, self.polls, self.downloads):
            log.clear()
        self.tasks.clear()

    # -- submit --------------------------------------------------------------------------------
    async def _submit(self, request: Request) -> Response:
        if request.headers.get("x-key") != self.api_key:
            return JSONResponse({"detail": "Not authenticated"}, status_code=401)
        model = request.path_params["model"]
        family = MODELS.get(model)
        if family is None:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return _invalid([(), "JSON decode error", "json_invalid"])
        self.submits.append(Recorded(f"/v1/{model}", dict(request.headers), json=body))
        b = self.behaviour
        if b.delay_s:
            await asyncio.sleep(b.delay_s)
        if b.fail_status and b.fail_times > 0:
            b.fail_times -= 1
            headers = {"retry-after": b.retry_after} if b.retry_after else {}
            return JSONResponse(b.error_body or {"detail": f"fake failure {b.fail_status}"},
                                status_code=b.fail_status, headers=headers)
        if (problem := validate(model, family, body)) is not None:
            return _invalid(problem)
        if b.submit == "garbage":
            return Response(b"<html><body>502 Bad Gateway</body></html>", media_type="text/html")
        task = Task(id=secrets.token_hex(16), model=model, body=body)
        self.tasks[task.id] = task
        host = b.polling_host or "127.0.0.1"
        answer: dict[str, Any] = {"id": task.id, "polling_url": f"http://{host}:{self.port}/v1/get_result?id={task.id}",
                                  "cost": 3.0, "input_mp": 0.0, "output_mp": 1.0}
        if b.submit == "missing_fields":
            answer.pop("polling_url")
        return JSONResponse(answer)

    # -- poll ----------------------------------------------------------------------------------
    async def _get_result(self, request: Request) -> Response:
        self.polls.append(Recorded(f"{request.url.path}?{request.url.query}", dict(request.headers)))
        if request.headers.get("x-key") != self.api_key:
            return JSONResponse({"detail": "Not authenticated"}, status_code=401)
        b = self.behaviour
        if b.poll_fail_status and b.poll_fail_times > 0:
            b.poll_fail_times -= 1
            return Response(b"upstream connect error", status_code=b.poll_fail_status, media_type="text/plain")
        task = self.tasks.get(request.query_params.get("id", ""))
        if task is None or b.outcome == "not_found":
            return _result(request.query_params.get("id", ""), "Task not found", status_code=404)
        task.polls += 1
        if b.outcome == "never" or task.polls <= b.pending_polls:
            return _result(task.id, b.pending_status, progress=min(0.9, task.polls / 10),
                           status_code=b.pending_http)
        return self._terminal(request, task)

    def _terminal(self, request: Request, task: Task) -> Response:
        b = self.behaviour
        code = b.terminal_http
        if b.outcome == "garbage":
            return Response(b'{"id": "' + task.id.encode() + b'", "status": ', media_type="application/json")
        if b.outcome == "no_status":
            return JSONResponse({"id": task.id, "result": None}, status_code=code)
        if b.outcome in ("request_moderated", "content_moderated"):
            status = "Request Moderated" if b.outcome == "request_moderated" else "Content Moderated"
            details = b.details if b.details is not None else {"Moderation Reasons": ["Derivative Works"]}
            return _result(task.id, status, details=details, status_code=code)
        if b.outcome == "error":
            return _result(task.id, "Error", details=b.details or {"error": "generation failed"}, status_code=code)
        result: dict[str, Any] = self._render(request, task)
        if b.outcome == "no_sample":
            result.pop("sample")
        return _result(task.id, "Ready", result=result, progress=1.0, status_code=code)

    def _render(self, request: Request, task: Task) -> dict[str, Any]:
        b, body = self.behaviour, task.body
        seed = body.get("seed") if isinstance(body.get("seed"), int) else secrets.randbelow(2**32)
        width, height = output_size(MODELS[task.model], body)
        fmt = body.get("output_format") or ("png" if MODELS[task.model] == "kontext" else "jpeg")
        data = b"this is not an image" if b.sample_not_image else solid_image(width, height, seed % 997, fmt)
        token = secrets.token_hex(12)
        self.samples[token] = (data, f"image/{fmt}", time.time() + b.sample_ttl_s)
        host = b.sample_host or "127.0.0.1"
        expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + b.sample_ttl_s))
        sample = (f"http://{host}:{self.port}/results/{token}/sample.{fmt}?se={expiry}&sp=r&sv=2024-11-04"
                  f"&sr=b&rsct=image/{fmt}&sig={secrets.token_urlsafe(24)}")
        prompt = body.get("prompt", "")
        if body.get("prompt_upsampling"):
            prompt = f"{prompt}, highly detailed, cinematic lighting"
        now = time.time()
        result = {"sample": sample, "prompt": prompt, "seed": seed + b.seed_shift, "start_time": now - 1.5,
                  "end_time": now, "duration": 1.5}
        if not b.report_seed:
            result.pop("seed")
        return result

    # -- delivery ------------------------------------------------------------------------------
    async def _delivery(self, request: Request) -> Response:
        token = request.path_params["token"]
        self.downloads.append(Recorded(request.url.path, dict(request.headers)))
        count = self.sample_downloads[token] = self.sample_downloads.get(token, 0) + 1
        sample = self.samples.get(token)
        limit = self.behaviour.sample_max_downloads
        if sample is None or time.time() >= sample[2] or (limit is not None and count > limit):
            xml = (b'<?xml version="1.0" encoding="utf-8"?><Error><Code>AuthenticationFailed</Code><Message>'
                   b"Server failed to authenticate the request. Signed expiry time has passed.</Message></Error>")
            return Response(xml, status_code=403, media_type="application/xml")
        return Response(sample[0], media_type=sample[1])


def _result(task_id: str, status: str, *, result: Any = None, progress: float | None = None,
            details: Any = None, status_code: int = 200) -> Response:
    body = {"id": task_id, "status": status, "result": result, "progress": progress, "details": details,
            "preview": None}
    return JSONResponse(body, status_code=status_code)


def _invalid(*problems: list[Any]) -> Response:
    """FastAPI's 422 `HTTPValidationError`."""
    detail = [{"type": kind, "loc": ["body", *loc], "msg": msg} for loc, msg, kind in problems]
    return JSONResponse({"detail": detail}, status_code=422)


def _image_size(value: Any) -> tuple[int, int] | None:
    try:
        with Image.open(io.BytesIO(base64.b64decode(value, validate=True))) as img:
            return img.size
    except (binascii.Error, ValueError, OSError, TypeError):
        return None


def validate(model: str, family: str, body: Any) -> list[Any] | None:
    """The first problem the real API would report for this body: [loc, msg, type], or None."""
    if not isinstance(body, dict):
        return [(), "Input should be a valid dictionary", "dict_type"]
    allowed = FIELDS[family] | TUNED.get(model, set())
    for name in body:
        if name not in allowed:
            return [(name,), "Extra inputs are not permitted", "extra_forbidden"]
    if not isinstance(body.get("prompt"), str) or (family in ("flux2", "kontext") and not body["prompt"]):
        return [("prompt",), "Field required", "missing"]
    if body.get("output_format", "jpeg") not in ("jpeg", "png"):
        return [("output_format",), "Input should be 'jpeg' or 'png'", "enum"]
    top = 5 if family == "flux2" else 6
    tolerance = body.get("safety_tolerance", 2)
    if type(tolerance) is not int or not 0 <= tolerance <= top:
        return [("safety_tolerance",), f"Input should be less than or equal to {top}", "less_than_equal"]
    if body.get("seed") is not None and type(body["seed"]) is not int:
        return [("seed",), "Input should be a valid integer", "int_type"]
    return _family_problem(model, family, body)


def _family_problem(model: str, family: str, body: dict[str, Any]) -> list[Any] | None:
    if family in ("flux2", "flux1"):
        multiple, low, high = (16, 64, 2048 * 4) if family == "flux2" else (32, 256, 1440)
        for side in ("width", "height"):
            value = body.get(side)
            if type(value) is not int or value % multiple or not low <= value <= high:
                return [(side,), f"Value error, {side} must be a multiple of {multiple} within {low}-{high}",
                        "value_error"]
        if family == "flux2" and body["width"] * body["height"] > 2048 * 2048:
            return [(), "Value error, width * height must not exceed 4 megapixels", "value_error"]
    if family in ("ultra", "kontext") and "aspect_ratio" in body:
        match = _RATIO.match(str(body["aspect_ratio"]))
        if not match or not 9 / 21 <= int(match[1]) / max(1, int(match[2])) <= 21 / 9:
            return [("aspect_ratio",), "Value error, aspect ratio must be between 21:9 and 9:21", "value_error"]
    limits = {"flux-2-klein-4b": 4, "flux-2-klein-9b": 4}
    images = [k for k in body if k.startswith("input_image")]
    if len(images) > limits.get(model, 8):
        return [(images[-1],), "Extra inputs are not permitted", "extra_forbidden"]
    for name in images + [k for k in ("image", "mask") if k in body]:
        if _image_size(body[name]) is None:
            return [(name,), "Value error, invalid image data", "value_error"]
    if family == "fill":
        if "image" not in body:
            return [("image",), "Field required", "missing"]
        if "mask" in body and _image_size(body["mask"]) != _image_size(body["image"]):
            return [("mask",), "Value error, mask must have the size of the image", "value_error"]
    return _tuning_problem(model, family, body)


def _tuning_problem(model: str, family: str, body: dict[str, Any]) -> list[Any] | None:
    ranges = {"flux-2-flex": ((1, 50), (1.5, 10)), "flux-pro": ((1, 50), (1.5, 5)), "flux-dev": ((1, 50), (1.5, 5))}
    steps, guidance = ranges.get(model, ((15, 50), (1.5, 100)) if family == "fill" else ((0, -1), (0, -1)))
    if "steps" in body and (type(body["steps"]) is not int or not steps[0] <= body["steps"] <= steps[1]):
        return [("steps",), f"Input should be between {steps[0]} and {steps[1]}", "value_error"]
    if "guidance" in body and not (isinstance(body["guidance"], (int, float))
                                   and guidance[0] <= body["guidance"] <= guidance[1]):
        return [("guidance",), f"Input should be between {guidance[0]} and {guidance[1]}", "value_error"]
    return None


def output_size(family: str, body: dict[str, Any]) -> tuple[int, int]:
    """What the real API makes: the asked size, the input's size (Fill), or ~1 MP of the ratio."""
    if family in ("flux2", "flux1"):
        return body["width"], body["height"]
    if family == "fill":
        return _image_size(body["image"]) or (1024, 1024)
    match = _RATIO.match(str(body.get("aspect_ratio", "")))
    if match:
        ratio = int(match[1]) / int(match[2])
    elif "input_image" in body:
        w, h = _image_size(body["input_image"]) or (1, 1)
        ratio = w / h
    else:
        ratio = 16 / 9 if family == "ultra" else 1.0
    height = math.sqrt(1024 * 1024 / ratio)
    return int(round(height * ratio / 32) * 32), int(round(height / 32) * 32)
