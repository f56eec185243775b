"""What a client asks for, in the pipeline's own terms. Every surface parses its dialect (OpenAI's
JSON or multipart, A1111's payloads, …) into an `ImageAsk` and its `Inputs`; from there on the
request is the same whichever way it came in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from imagegate.providers.base import InputImage


@dataclass(frozen=True, slots=True)
class ImageAsk:
    """The fields of one image request, typed and range-checked by the surface; per-model rules are
    checked by `validation.prepare`. None means "not given": the model's default applies."""

    prompt: str | None
    model: str | None = None
    n: int | None = None
    size: str | None = None
    aspect_ratio: str | None = None
    response_format: str | None = None
    output_format: str | None = None
    output_compression: int | None = None
    background: str | None = None
    quality: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    strength: float | None = None
    stream: bool = False
    partial_images: int = 0
    # Fields some upstreams understand (user, safety_identifier, moderation, style, input_fidelity).
    hints: dict[str, Any] = field(default_factory=dict)
    # Sampler and inpainting choices in A1111's names (see ImageRequest.tuning).
    tuning: dict[str, Any] = field(default_factory=dict)
    # Previews to make even without a stream (the A1111 surface's /progress shows the latest).
    previews: int = 0
    # How long the result images must stay fetchable, when a surface promises more than
    # artifacts.ttl_hours (seed 004's qwen URLs: 7 days).
    keep_s: int | None = None
    # Where an async task's end is announced (Standard Webhooks); checked at submission.
    webhook_url: str | None = None
    # Whether the answer hands out its images as artifacts (an id, a URL), so they are kept; a
    # surface whose answer carries the base64 and no id (A1111's, OpenAI's b64_json when
    # artifacts.keep_b64_answers is off) spares the write. Async task results are always kept.
    artifacts: bool = True
    # Fields the surface does not know: a 400 unless the model passes them through.
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Inputs:
    """Input images, each already checked to be a real image of an allowed format."""

    images: list[InputImage] = field(default_factory=list)
    mask: InputImage | None = None
    # Per image, the artifact it was read from (None: given as bytes, base64 or a URL, not stored yet).
    artifact_ids: list[str | None] = field(default_factory=list)

    def artifact_of(self, index: int) -> str | None:
        return self.artifact_ids[index] if index < len(self.artifact_ids) else None

    def blobs(self) -> list[bytes]:
        """The bytes of every input, in order: what makes two requests with files "the same"."""
        return [image.data for image in self.images] + ([self.mask.data] if self.mask else [])
