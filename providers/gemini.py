"""`gemini`: Google Gemini image output ("Nano Banana") through `models/{model}:generateContent`.

Gemini takes no size, no n and no negative prompt. The asked size becomes the nearest supported
`aspectRatio` plus an `imageSize` tier, and the gateway fits the fixed-size answer to the asked size;
n becomes n parallel calls with seeds seed+i; input images travel as `inlineData` parts after the
prompt (edits and multi-reference alike; there are no masks). The key goes in `x-goog-api-key`,
never in the URL.
"""

from __future__ import annotations

import math
import re
from functools import partial
from typing import Any, Literal
from urllib.parse import quote

import httpx
import orjson
import pybase64
from pydantic import Field, field_validator

from . import aio, http
from .base import GeneratedImage, ImageRequest, ProviderResult, UpstreamError
from .options import HTTPProviderOptions
from .remote import HTTPProvider

# The ratios of the public ImageConfig (google-genai 3.4.0 and the v1beta discovery document).
ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "9:16", "16:9", "21:9")
# Each tier answers about this many pixels squared (1K: 1024x1024, 1248x832, 1344x768, …).
IMAGE_SIZES = {"1K": 1024, "2K": 2048, "4K": 4096}
MAX_UPSCALE = 1.25
# Gemini's seed is an int32.
SEED_MODULUS = 2**31
# Why an answer carries no image, when the reason is moderation (a 400, no retry, no fallback).
POLICY_REASONS = frozenset({"SAFETY", "IMAGE_SAFETY", "PROHIBITED_CONTENT", "IMAGE_PROHIBITED_CONTENT",
                            "BLOCKLIST", "SPII", "RECITATION", "IMAGE_RECITATION"})
_RATIO = re.compile(r"^([1-9]\d?):([1-9]\d?)$")
_DELAY = re.compile(r"^(\d+(?:\.\d+)?)s$")


Modality = Literal["TEXT", "IMAGE"]
MODALITIES: tuple[Modality, ...] = ("TEXT", "IMAGE")


class GeminiOptions(HTTPProviderOptions):
    base_url: str = "https://generativelanguage.googleapis.com"
    api_version: str = "v1beta"
    response_modalities: list[Modality] = Field(default_factory=lambda: list(MODALITIES))
    # Newer models take more (4:5, 5:4, …): list them here to use them.
    aspect_ratios: list[str] = Field(default_factory=lambda: list(ASPECT_RATIOS), min_length=1)
    # false for models that refuse `imageConfig.imageSize` (they answer 1K only).
    send_image_size: bool = True
    # gemini-3-pro-image takes up to 14 reference images; gemini-2.5-flash-image works best with 3.
    max_input_images: int = Field(default=14, ge=1)
    # Gemini has no negative prompt; true appends "Avoid: …" to the prompt instead of ignoring it.
    append_negative_prompt: bool = False
    # Sent as `safetySettings`, e.g. [{category: HARM_CATEGORY_HARASSMENT, threshold: BLOCK_ONLY_HIGH}].
    safety_settings: list[dict[str, str]] = Field(default_factory=list)

    @field_validator("response_modalities")
    @classmethod
    def _asks_for_images(cls, value: list[str]) -> list[str]:
        if "IMAGE" not in value or len(set(value)) != len(value):
            raise ValueError("must contain IMAGE, each modality once")
        return value

    @field_validator("aspect_ratios")
    @classmethod
    def _ratio_shape(cls, value: list[str]) -> list[str]:
        for ratio in value:
            if not _RATIO.match(ratio):
                raise ValueError(f"aspect ratio {ratio!r} is not of the form W:H")
        return value


def ratio_of(aspect: str) -> float:
    width, _, height = aspect.partition(":")
    return int(width) / int(height)


def nearest_aspect_ratio(width: int, height: int, ratios: tuple[str, ...] | list[str] = ASPECT_RATIOS) -> str:
    """The supported ratio nearest to width:height, measured in log ratio (2:1 is as far from 1:1 as 1:2)."""
    target = math.log(width / height)
    return min(ratios, key=lambda r: abs(math.log(ratio_of(r)) - target))


def image_size_for(width: int, height: int, aspect: str) -> str:
    """The smallest tier whose answer needs at most MAX_UPSCALE to fit the asked size, else the largest.

    Upscaling loses detail and a bigger tier costs more (4K) or takes longer: a little upscaling is
    the better trade, so 1536x1024 stays 1K (1248x832 scaled 1.23x) while 1536x1536 asks for 2K.
    """
    root = math.sqrt(ratio_of(aspect))
    for tier, side in IMAGE_SIZES.items():
        # The gateway crops the answer to the asked ratio, then scales it by this factor.
        if max(width / (side * root), height * root / side) <= MAX_UPSCALE:
            return tier
    return "4K"


def image_config(width: int, height: int, *, ratios: tuple[str, ...] | list[str] = ASPECT_RATIOS,
                 send_image_size: bool = True) -> dict[str, str]:
    aspect = nearest_aspect_ratio(width, height, ratios)
    config = {"aspectRatio": aspect}
    tier = image_size_for(width, height, aspect)
    # 1K is the default, and older image models refuse the field: send it only when it changes something.
    if send_image_size and tier != "1K":
        config["imageSize"] = tier
    return config


class GeminiProvider(HTTPProvider):
    kind = "gemini"
    honours = frozenset()
    capabilities = frozenset({"generate", "edit", "multi-reference"})
    Options = GeminiOptions
    options: GeminiOptions

    def auth_headers(self) -> dict[str, str]:
        return {"x-goog-api-key": self.options.api_key}

    def unsupported(self, request: ImageRequest) -> str | None:
        if request.mask is not None:
            return "Gemini edits by instruction and takes no mask"
        if len(request.images) > self.options.max_input_images:
            return f"at most {self.options.max_input_images} input images (got {len(request.images)})"
        return None

    def endpoint(self, model: str) -> str:
        # Configs may name the model as Google's resource name ("models/…").
        name = quote(model.removeprefix("models/"), safe="")
        return f"{self.base}/{self.options.api_version}/models/{name}:generateContent"

    def prompt(self, request: ImageRequest) -> str:
        if self.options.append_negative_prompt and request.negative_prompt:
            return f"{request.prompt}\n\nAvoid: {request.negative_prompt}"
        return request.prompt

    def parts(self, request: ImageRequest) -> list[dict[str, Any]]:
        """The prompt, then each input image inline; built once and shared by the n calls."""
        images = [{"inlineData": {"mimeType": img.content_type, "data": pybase64.b64encode(img.data).decode("ascii")}}
                  for img in request.images]
        return [{"text": self.prompt(request)}, *images]

    def body(self, request: ImageRequest, parts: list[dict[str, Any]], seed: int) -> dict[str, Any]:
        config = image_config(request.width, request.height, ratios=self.options.aspect_ratios,
                              send_image_size=self.options.send_image_size)
        # A client that named Gemini's own ratio and tier (the native surface) gets them as asked.
        if isinstance(ratio := request.tuning.get("aspect_ratio"), str):
            config["aspectRatio"] = ratio
        if isinstance(tier := request.tuning.get("image_size"), str) and self.options.send_image_size:
            config["imageSize"] = tier
        # Fields a model's `allow_extra_fields` lets through (temperature, …) go in generationConfig; ours win.
        generation = {**request.extra, "responseModalities": list(self.options.response_modalities),
                      "imageConfig": config, "seed": seed}
        body: dict[str, Any] = {"contents": [{"role": "user", "parts": parts}], "generationConfig": generation}
        if self.options.safety_settings:
            body["safetySettings"] = self.options.safety_settings
        return body

    async def run(self, request: ImageRequest) -> ProviderResult:
        url, parts = self.endpoint(request.upstream_model), self.parts(request)
        answers = await aio.gather([partial(self._one, url, request, parts, i) for i in range(request.n)])
        metadata = {"model_version": answers[0][1].get("modelVersion"),
                    "text": [text for _, answer in answers for text in _texts(answer)]}
        return ProviderResult(images=[image for image, _ in answers], metadata=metadata)

    async def _one(self, url: str, request: ImageRequest, parts: list[dict[str, Any]],
                   index: int) -> tuple[GeneratedImage, dict[str, Any]]:
        seed = request.seed_for(index) % SEED_MODULUS
        # orjson: the body carries megabytes of base64 when there are reference images.
        body = await self.call("POST", url, content=orjson.dumps(self.body(request, parts, seed)),
                               headers={"content-type": "application/json"})
        if not isinstance(body, dict):
            raise http.bad_response("upstream answer is not a JSON object")
        return self.read_image(body, seed), body

    def read_image(self, body: dict[str, Any], seed: int) -> GeneratedImage:
        """The image of the first candidate, or why there is none as the error the client should see."""
        feedback = body.get("promptFeedback")
        feedback = feedback if isinstance(feedback, dict) else {}
        block = feedback.get("blockReason")
        if block and block != "BLOCK_REASON_UNSPECIFIED":
            raise self.refused(str(block), feedback.get("blockReasonMessage"))
        candidates = body.get("candidates")
        if not candidates:
            raise _no_image("the upstream answered with no candidates")
        candidate = candidates[0] if isinstance(candidates, list) else None
        if not isinstance(candidate, dict):
            raise http.bad_response("upstream candidates are not a list of objects")
        data = _image_data(_parts(candidate))
        if data is not None:
            return http.decode_b64_image(data, seed=seed)
        reason = str(candidate.get("finishReason") or "")
        if reason in POLICY_REASONS:
            raise self.refused(reason, candidate.get("finishMessage"))
        said = " ".join(_texts(body))
        detail = f": {self.clean(said, 200)}" if said else ""
        raise _no_image(f"the upstream answered without an image ({reason or 'no finishReason'}){detail}")

    def refused(self, reason: str, message: Any) -> UpstreamError:
        detail = f": {self.clean(message, 300)}" if isinstance(message, str) and message else ""
        return UpstreamError(f"the upstream refused the request ({self.clean(reason, 60)}){detail}", status=400,
                             code="content_policy_violation")

    def error(self, response: httpx.Response) -> UpstreamError:
        status = response.status_code
        err = _google_error(response)
        message = self.clean(err.get("message") or f"HTTP {status}")
        details = [d for d in err.get("details") or [] if isinstance(d, dict)]
        reasons = {d.get("reason") for d in details}
        retry_after = http.retry_after_seconds(response)
        # A wrong key is HTTP 400 INVALID_ARGUMENT on this API: only the detail's reason tells it apart.
        if status in (401, 403) or "API_KEY_INVALID" in reasons or err.get("status") in (
                "UNAUTHENTICATED", "PERMISSION_DENIED"):
            return UpstreamError(f"upstream rejected the gateway's credentials: {message}", status=502,
                                 code="upstream_auth_failed", fallback=True)
        if status == 429 and _daily_quota(details):
            # A per-day quota spent: waiting seconds does not help. Fall back; the breaker counts it.
            return UpstreamError(f"the upstream account is out of quota: {message}", status=502,
                                 code="upstream_quota_exceeded", fallback=True)
        if status == 429 and retry_after is None:
            retry_after = _retry_delay(details)
        if status == 400 and err.get("status") == "FAILED_PRECONDITION":
            # E.g. "User location is not supported": the gateway's account, not the request; another route may do.
            return UpstreamError(f"upstream cannot serve this gateway: {message}", status=502, code="upstream_error",
                                 fallback=True)
        return http.error_for_status(status, message, retry_after=retry_after)


def _daily_quota(details: list[dict[str, Any]]) -> bool:
    """A QuotaFailure naming a per-day quota (e.g. `GenerateRequestsPerDayPerProjectPerModel`)."""
    for detail in details:
        if str(detail.get("@type", "")).endswith("google.rpc.QuotaFailure"):
            violations = detail.get("violations")
            if isinstance(violations, list) and any(
                    isinstance(v, dict) and "PerDay" in str(v.get("quotaId", "")) for v in violations):
                return True
    return False


def _parts(candidate: dict[str, Any]) -> list[dict[str, Any]]:
    content = candidate.get("content")
    if content is None:
        return []
    parts = content.get("parts") if isinstance(content, dict) else None
    if parts is None:
        return []
    if not isinstance(parts, list):
        raise http.bad_response("upstream candidate parts are not a list")
    return [p for p in parts if isinstance(p, dict)]


def _image_data(parts: list[dict[str, Any]]) -> Any:
    """The base64 of the first image part that is not a thought (Gemini 3 may show draft images as thoughts).

    JSON from the REST API is camelCase; proxies that re-serialize the SDK's objects write snake_case.
    """
    for part in parts:
        inline = part.get("inlineData") or part.get("inline_data")
        if part.get("thought") or not isinstance(inline, dict):
            continue
        mime = inline.get("mimeType") or inline.get("mime_type")
        if isinstance(mime, str) and mime.startswith("image/"):
            return inline.get("data")
    return None


def _texts(body: dict[str, Any]) -> list[str]:
    candidates = body.get("candidates")
    if not isinstance(candidates, list) or not candidates or not isinstance(candidates[0], dict):
        return []
    return [p["text"] for p in _parts(candidates[0]) if isinstance(p.get("text"), str) and not p.get("thought")]


def _no_image(message: str) -> UpstreamError:
    # The model sometimes answers with words only; another route (or a later try) may well draw it.
    return UpstreamError(message, status=502, code="upstream_no_image", fallback=True)


def _google_error(response: httpx.Response) -> dict[str, Any]:
    """`{"error": {code, message, status, details}}`, sometimes wrapped in a list; {} when unreadable."""
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return {}
    if isinstance(body, list) and body:
        body = body[0]
    err = body.get("error") if isinstance(body, dict) else None
    return err if isinstance(err, dict) else {}


def _retry_delay(details: list[dict[str, Any]]) -> float | None:
    """Seconds from a google.rpc.RetryInfo detail (`"retryDelay": "12s"`)."""
    for detail in details:
        match = _DELAY.match(str(detail.get("retryDelay") or ""))
        if match:
            return float(match[1])
    return None
