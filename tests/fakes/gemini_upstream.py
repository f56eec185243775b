"""A fake Gemini API: `POST /v1beta/models/{model}:generateContent` with image output ("Nano Banana").

It answers like generativelanguage.googleapis.com: the key in `x-goog-api-key` (or `?key=`), Google's
error bodies `{"error": {code, message, status, details}}` (a wrong key is HTTP 400 INVALID_ARGUMENT
with the reason API_KEY_INVALID; no key is 403 PERMISSION_DENIED), the generationConfig checks the
real API makes (unknown fields, modalities, aspectRatio, imageSize, int32 seed), and a text part
plus an inlineData PNG of Gemini's fixed size for the aspect ratio and size tier. An edit's image
is the first input image inverted, so a test can see the input was used. It records every request
that passes auth; `behave(...)` makes it misbehave. Validation messages are close, not verbatim.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
import secrets
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson
from PIL import Image, ImageOps
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .openai_upstream import solid_image
from .server import FakeUpstream

# Gemini's answer sizes at 1K (ai.google.dev image-generation docs); 2K and 4K double and quadruple them.
SIZES_1K = {"1:1": (1024, 1024), "2:3": (832, 1248), "3:2": (1248, 832), "3:4": (864, 1184), "4:3": (1184, 864),
            "4:5": (896, 1152), "5:4": (1152, 896), "9:16": (768, 1344), "16:9": (1344, 768), "21:9": (1536, 672)}
TIERS = {"1K": 1, "2K": 2, "4K": 4}
MODELS = {"gemini-2.5-flash-image", "gemini-2.5-flash-image-preview", "gemini-3-pro-image-preview",
          "gemini-3.1-flash-image-preview"}
OLD_MODELS = {"gemini-2.5-flash-image", "gemini-2.5-flash-image-preview"}  # refuse imageSize
MAX_INPUT_IMAGES = 14
GENERATION_FIELDS = {"stopSequences", "responseMimeType", "responseSchema", "candidateCount", "maxOutputTokens",
                     "temperature", "topP", "topK", "seed", "presencePenalty", "frequencyPenalty",
                     "responseLogprobs", "logprobs", "enableEnhancedCivicAnswers", "responseModalities",
                     "speechConfig", "thinkingConfig", "imageConfig", "mediaResolution"}
STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
MESSAGES = {400: "Request contains an invalid argument.", 403: "The caller does not have permission",
            429: "You exceeded your current quota, please check your plan and billing details.",
            500: "An internal error has occurred. Please retry or report in "
                 "https://developers.generativeai.google/guide/troubleshooting",
            503: "The model is overloaded. Please try again later."}
TOGETHER_WAIT_S = 30.0  # how long `behave(together=…)` holds a call for the others
BAD_KEY = "API key not valid. Please pass a valid API key."


@dataclass
class GeminiCall:
    model: str
    headers: dict[str, str]
    query: str
    body: Any
    answered: tuple[int, int] | None = None  # the size of the image the fake sent back

    @property
    def parts(self) -> list[dict[str, Any]]:
        return self.body["contents"][0]["parts"]  # type: ignore[no-any-return]

    @property
    def config(self) -> dict[str, Any]:
        return self.body.get("generationConfig", {})  # type: ignore[no-any-return]

    @property
    def images(self) -> list[tuple[str, bytes]]:
        """(mimeType, bytes) of each inlineData part, in order."""
        inline = [p.get("inlineData") or p.get("inline_data") for p in self.parts]
        return [(i["mimeType"], base64.b64decode(i["data"])) for i in inline if i]


class BadRequest(Exception):
    pass


def google_error(status: int, message: str, details: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None) -> Response:
    error: dict[str, Any] = {"code": status, "message": message, "status": STATUS_NAMES.get(status, "UNKNOWN")}
    if details:
        error["details"] = details
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def _camel(name: str) -> str:
    # Google's JSON parser takes proto field names (snake_case) as well as lowerCamelCase.
    return re.sub(r"_([a-z])", lambda m: m[1].upper(), name)


@lru_cache(maxsize=16)
def inverted(source: bytes, width: int, height: int) -> bytes:
    img = ImageOps.invert(ImageOps.fit(Image.open(io.BytesIO(source)).convert("RGB"), (width, height)))
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


class FakeGemini(FakeUpstream):
    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.calls: list[GeminiCall] = []
        self.behave()
        self.app = Starlette(routes=[Route("/v1beta/models/{model}:generateContent", self._generate,
                                           methods=["POST"])])

    # -- control -------------------------------------------------------------------------
    def behave(self, *, mode: str = "image", finish_reason: str | None = None, block_reason: str = "SAFETY",
               fail_status: int | None = None, fail_times: int = 1_000_000, error_body: dict[str, Any] | None = None,
               retry_after: str | None = None, retry_delay: str | None = None, delay_s: float = 0.0,
               together: int = 0) -> None:
        """mode: image | snake_case | thought | with_audio | text_only | refused | blocked | no_candidates | garbage |
        bad_base64 | not_image. `fail_status` answers Google's error body for that status `fail_times` times.
        `together`: hold every call until that many have arrived (a barrier, so that the calls of a fan-out
        all reach the fake before any of them answers; gives up after TOGETHER_WAIT_S)."""
        self.mode, self.finish_reason, self.block_reason = mode, finish_reason, block_reason
        self.fail_status, self.fail_times, self.error_body = fail_status, fail_times, error_body
        self.retry_after, self.retry_delay, self.delay_s = retry_after, retry_delay, delay_s
        self.together = together

    def reset(self) -> None:
        self.calls.clear()
        self.behave()

    @property
    def last(self) -> GeminiCall:
        return self.calls[-1]

    # -- handler -------------------------------------------------------------------------
    async def _generate(self, request: Request) -> Response:
        key = request.headers.get("x-goog-api-key") or request.query_params.get("key")
        if not key:
            return google_error(403, "Method doesn't allow unregistered callers (callers without established "
                                     "identity). Please use API Key or other form of API consumer identity to call "
                                     "this API.")
        if key != self.api_key:
            return google_error(400, BAD_KEY, [
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                 "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}},
                {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US", "message": BAD_KEY}])
        model = request.path_params["model"]
        raw = await request.body()
        try:
            body: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        call = GeminiCall(model, dict(request.headers), request.url.query, body)
        self.calls.append(call)
        if model not in MODELS:
            return google_error(404, f"models/{model} is not found for API version v1beta, or is not supported "
                                     "for generateContent. Call ListModels to see the list of available models.")
        if self.together:
            deadline = time.monotonic() + TOGETHER_WAIT_S
            while len(self.calls) < self.together and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail_status and self.fail_times > 0:
            self.fail_times -= 1
            return self._failure(self.fail_status)
        try:
            size = self._validate(model, body)
        except BadRequest as exc:
            return google_error(400, str(exc))
        return self._answer(call, size)

    def _failure(self, status: int) -> Response:
        headers = {"retry-after": self.retry_after} if self.retry_after else None
        if self.error_body is not None:
            return JSONResponse(self.error_body, status_code=status, headers=headers)
        details: list[dict[str, Any]] = []
        if status == 429:
            details.append({"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [
                {"quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
                 "quotaId": "GenerateRequestsPerMinutePerProjectPerModel"}]})
        if self.retry_delay:
            details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": self.retry_delay})
        return google_error(status, MESSAGES.get(status, f"fake failure {status}"), details, headers)

    # -- what the real API checks --------------------------------------------------------
    def _validate(self, model: str, body: Any) -> tuple[int, int]:
        """Raise BadRequest like the real API; return the size of the image to answer."""
        if not isinstance(body, dict):
            raise BadRequest("Invalid JSON payload received. Expected an object.")
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            raise BadRequest("* GenerateContentRequest.contents: contents is not specified")
        images = [self._check_part(p) for c in contents if isinstance(c, dict) for p in c.get("parts") or []]
        sources = [img for img in images if img is not None]
        if len(sources) > MAX_INPUT_IMAGES:
            raise BadRequest(f"Too many images: at most {MAX_INPUT_IMAGES} input images are supported.")
        config = {_camel(k): v for k, v in (body.get("generationConfig") or {}).items()}
        for name in config:
            if name not in GENERATION_FIELDS:
                raise BadRequest(f"Invalid JSON payload received. Unknown name \"{name}\" at 'generation_config': "
                                 "Cannot find field.")
        for i, modality in enumerate(config.get("responseModalities") or ["TEXT", "IMAGE"]):
            if modality not in ("TEXT", "IMAGE", "AUDIO"):
                raise BadRequest(f"Invalid value at 'generation_config.response_modalities[{i}]' "
                                 f"(type.googleapis.com/google.ai.generativelanguage.v1beta.GenerationConfig.Modality)"
                                 f", \"{modality}\"")
        seed = config.get("seed")
        if seed is not None and (not isinstance(seed, int) or not -(2**31) <= seed < 2**31):
            raise BadRequest(f"Invalid value at 'generation_config.seed' (TYPE_INT32), {seed}")
        return self._size(model, {_camel(k): v for k, v in (config.get("imageConfig") or {}).items()}, sources)

    @staticmethod
    def _check_part(part: Any) -> bytes | None:
        inline = part.get("inlineData") or part.get("inline_data") if isinstance(part, dict) else None
        if inline is None:
            if not isinstance(part, dict) or not isinstance(part.get("text"), str):
                raise BadRequest("* GenerateContentRequest.contents.parts: must have one initialized field")
            return None
        mime, data = inline.get("mimeType") or inline.get("mime_type"), inline.get("data")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise BadRequest("Invalid value at 'contents[0].parts[1].inline_data.data' (TYPE_BYTES), "
                             "Base64 decoding failed") from None
        if mime not in ("image/png", "image/jpeg", "image/webp", "image/heic", "image/heif"):
            raise BadRequest(f"Unsupported MIME type: {mime}")
        return raw

    @staticmethod
    def _size(model: str, image_config: dict[str, Any], sources: list[bytes]) -> tuple[int, int]:
        aspect = image_config.get("aspectRatio")
        if aspect is None:  # the model follows the first input image, else squares
            aspect = "1:1"
            if sources:
                w, h = Image.open(io.BytesIO(sources[0])).size
                aspect = min(SIZES_1K, key=lambda r: abs(SIZES_1K[r][0] / SIZES_1K[r][1] - w / h))
        if aspect not in SIZES_1K:
            raise BadRequest(f"Unsupported aspect ratio: {aspect}. Supported values are: {', '.join(SIZES_1K)}.")
        tier = image_config.get("imageSize", "1K")
        if "imageSize" in image_config and model in OLD_MODELS:
            raise BadRequest("Image size is not supported for this model.")
        if tier not in TIERS:
            raise BadRequest(f"Unsupported image size: {tier}. Supported values are: 1K, 2K, 4K.")
        width, height = SIZES_1K[aspect]
        return width * TIERS[tier], height * TIERS[tier]

    # -- answers -------------------------------------------------------------------------
    def _answer(self, call: GeminiCall, size: tuple[int, int]) -> Response:
        if self.mode == "garbage":
            return Response(b"<html><body>Error 502 (Server Error)!!1</body></html>", status_code=200,
                            media_type="text/html")
        meta = {"usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 1290, "totalTokenCount": 1302},
                "modelVersion": call.model, "responseId": secrets.token_urlsafe(12)}
        if self.mode == "blocked":
            return JSONResponse({"promptFeedback": {"blockReason": self.block_reason}, **meta})
        if self.mode == "no_candidates":
            return JSONResponse(meta)
        candidate: dict[str, Any] = {"finishReason": self.finish_reason or "STOP", "index": 0}
        text = {"text": "Here is the image you asked for."}
        if self.mode == "refused":
            candidate["finishReason"] = self.finish_reason or "IMAGE_SAFETY"
            candidate["finishMessage"] = "Unable to show the generated image: it may violate our policies."
        elif self.mode == "text_only" or "IMAGE" not in (call.config.get("responseModalities") or ["IMAGE"]):
            candidate["content"] = {"role": "model", "parts": [{"text": "I can't draw that, but here is a poem."}]}
        else:
            call.answered = size
            candidate["content"] = {"role": "model", "parts": self._image_parts(call, size, text)}
        return Response(orjson.dumps({"candidates": [candidate], **meta}), media_type="application/json")

    def _image_parts(self, call: GeminiCall, size: tuple[int, int], text: dict[str, Any]) -> list[dict[str, Any]]:
        sources = call.images
        image = inverted(sources[0][1], *size) if sources else solid_image(*size, int(call.config.get("seed", 0)))
        data = base64.b64encode(image).decode()
        if self.mode == "bad_base64":
            data = "%%% this is not base64 %%%"
        elif self.mode == "not_image":
            data = base64.b64encode(b"definitely not an image").decode()
        if self.mode == "snake_case":
            return [text, {"inline_data": {"mime_type": "image/png", "data": data}}]
        parts = [text, {"inlineData": {"mimeType": "image/png", "data": data}}]
        if self.mode == "with_audio":  # media that is not an image, before the image
            parts.insert(1, {"inlineData": {"mimeType": "audio/L16;codec=pcm;rate=24000", "data": "AAAAAA=="}})
        if self.mode == "thought":  # a draft image shown as a thought, before the final one
            draft = base64.b64encode(solid_image(*size, 999)).decode()
            parts[:0] = [{"text": "Planning the composition.", "thought": True},
                         {"inlineData": {"mimeType": "image/png", "data": draft}, "thought": True}]
        return parts
