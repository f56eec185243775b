"""What a finished request hands back: its images as `data[]` items and the images body.

Synchronous answers, task results and stream events all build their items here, so an image
carries the same facts (seed, revised prompt, artifact) whichever way it leaves."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .normalize import DeliveredImage
from .pricing import Price
from .validation import Prepared


@dataclass(frozen=True, slots=True)
class Delivered:
    """The images a request delivered, and what they cost (fewer than asked cost less)."""

    images: list[DeliveredImage]
    price: Price


@dataclass(frozen=True, slots=True)
class Generation:
    """A finished synchronous request: its images with seeds, what it cost and who served it."""

    prepared: Prepared
    provider: str
    delivered: Delivered
    billing: dict[str, Any]  # the price of what was delivered, plus the hold's amounts when metered
    metadata: dict[str, Any] = field(default_factory=dict)  # what the provider reported (sampler, …)
    inputs: list[str] = field(default_factory=list)  # the input images' artifact ids, in order
    fallback: bool = False  # served by a later route than the model's first

    @property
    def images(self) -> list[DeliveredImage]:
        return self.delivered.images


def image_item(image: DeliveredImage, **handed_over: Any) -> dict[str, Any]:
    """One `data[]` item: how the image is handed over (`b64_json`, or `url` and `artifact_id`),
    then what is known of it."""
    item = dict(handed_over)
    if image.revised_prompt:
        item["revised_prompt"] = image.revised_prompt
    item["seed"] = image.seed
    return item


def images_body(items: list[dict[str, Any]], delivered: Delivered, prepared: Prepared,
                billing: dict[str, Any], inputs: list[str] | None = None) -> dict[str, Any]:
    """OpenAI's ImagesResponse plus the gateway's fields (model, billing, the inputs' artifact ids)."""
    first, request = delivered.images[0].info, prepared.request
    body: dict[str, Any] = {"created": int(time.time()), "data": items, "output_format": first.format,
                            "size": f"{first.width}x{first.height}", "model": prepared.model_id,
                            "billing": billing}
    if request.quality:
        body["quality"] = request.quality
    if request.background:
        body["background"] = request.background
    if inputs:
        body["inputs"] = [{"artifact_id": artifact_id} for artifact_id in inputs]
    return body
