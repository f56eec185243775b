"""The OpenAI surface's request bodies as pydantic models: types and ranges. Per-model rules are the
pipeline's (router/pipeline/validation.py); `ask()` hands a body over to it."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import invalid
from ..pipeline import ImageAsk

MAX_PROMPT = 32_000
# Fields of OpenAI's API (or ours) that some upstreams understand and we pass on as hints.
HINT_FIELDS = ("user", "safety_identifier", "moderation", "style", "input_fidelity")


class GenerationBody(BaseModel):
    # Extras are kept so that we can name an unknown field, or pass it on where the model allows.
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    model: str | None = None
    prompt: str | None = None
    n: int | None = Field(default=None, ge=1)
    size: str | None = None
    aspect_ratio: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "jpg", "webp"] | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    background: Literal["auto", "opaque", "transparent"] | None = None
    quality: Literal["auto", "low", "medium", "high", "standard", "hd"] | None = None
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    steps: int | None = None
    guidance_scale: float | None = Field(default=None, ge=0, le=100)
    stream: bool | None = None
    partial_images: int | None = Field(default=None, ge=0, le=3)
    user: str | None = None
    safety_identifier: str | None = None
    moderation: Literal["auto", "low"] | None = None
    style: Literal["vivid", "natural"] | None = None
    is_async: bool | None = Field(default=None, alias="async")
    dry_run: bool | None = None  # validate and quote only: no charge, no upstream call
    webhook_url: str | None = Field(default=None, max_length=2048)  # an async request's end, announced

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | None) -> str | None:
        if value is not None and len(value) > MAX_PROMPT:
            raise ValueError(f"prompt is longer than {MAX_PROMPT} characters")
        return value

    def hints(self) -> dict[str, Any]:
        return {k: getattr(self, k, None) for k in HINT_FIELDS if getattr(self, k, None) is not None}

    def ask(self, *, artifacts: bool = True) -> ImageAsk:
        return ImageAsk(
            prompt=self.prompt, model=self.model, n=self.n, size=self.size, aspect_ratio=self.aspect_ratio,
            response_format=self.response_format, output_format=self.output_format,
            output_compression=self.output_compression, background=self.background, quality=self.quality,
            negative_prompt=self.negative_prompt, seed=self.seed, steps=self.steps,
            guidance_scale=self.guidance_scale, strength=self.edit_strength(), stream=bool(self.stream),
            partial_images=self.partial_images or 0, hints=self.hints(), extra=dict(self.model_extra or {}),
            webhook_url=self.webhook_url, artifacts=artifacts)

    def edit_strength(self) -> float | None:
        return None  # generations take no strength (as a field it is an unknown one)


class EditBody(GenerationBody):
    strength: float | None = Field(default=None, ge=0, le=1)
    input_fidelity: Literal["low", "high"] | None = None

    def edit_strength(self) -> float | None:
        return self.strength


class ImageToImageBody(EditBody):
    """POST /v1/images/image-to-image (seed 003): references in, images out, a task by default."""

    quality: Literal["standard", "hd"] | None = None
    aspect_ratio: Literal["auto", "1:1", "16:9", "9:16", "4:3", "3:4", "2:1"] | None = None
    n: int | None = Field(default=None, ge=1, le=4)

    def ask(self, *, artifacts: bool = True) -> ImageAsk:
        if self.quality == "hd" and self.aspect_ratio in (None, "auto"):
            raise invalid("aspect_ratio 'auto' runs only at standard quality; give an aspect_ratio for hd",
                          "aspect_ratio")
        ask = super().ask(artifacts=artifacts)
        return replace(ask, aspect_ratio=None if self.aspect_ratio == "auto" else self.aspect_ratio)


_NUMBERS = {"n", "seed", "steps", "guidance_scale", "output_compression", "partial_images", "strength"}


def parse_body(model: type[GenerationBody], data: Any) -> GenerationBody:
    """Validate a decoded body; the first problem becomes a 400 naming its field."""
    if not isinstance(data, dict):
        raise invalid("the request body must be a JSON object", code="invalid_json")
    # OpenAI clients send JSON null for "not set"; treat it as absent.
    data = {k: v for k, v in data.items() if v is not None}
    for name in _NUMBERS & data.keys():
        if isinstance(data[name], bool):  # pydantic would read true as 1
            raise invalid(f"invalid value for '{name}': expected a number, got a boolean", param=name)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        raise invalid(f"invalid value for '{param}': {first['msg']}", param=param) from None
