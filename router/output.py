"""Output normalization: check each upstream image, convert only when needed, answer as asked."""

from __future__ import annotations

import time
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import anyio.to_thread
import pybase64

from imagegate.providers.base import GeneratedImage, ImageRequest
from imagegate.providers.imaging import ImageCheckError, ImageInfo, convert, inspect, needs_conversion

from .artifacts import ArtifactStore
from .errors import ApiError

MICRO = Decimal(1_000_000)


@dataclass(frozen=True, slots=True)
class Price:
    megapixels: Decimal
    price_per_mp: Decimal
    cost_micros: int

    @classmethod
    def of(cls, width: int, height: int, n: int, price_per_mp: Decimal) -> Price:
        """Exact: megapixels = W×H×n / 10^6; cost rounded half-up to the micro-dollar."""
        mp = Decimal(width * height * n) / MICRO
        return cls(mp, price_per_mp, int((mp * price_per_mp * MICRO).quantize(Decimal(1), ROUND_HALF_UP)))

    @property
    def cost(self) -> Decimal:
        return Decimal(self.cost_micros) / MICRO

    def header(self) -> str:
        return f"{self.cost:.6f}"

    def body(self) -> dict[str, Any]:
        return {"megapixels": float(self.megapixels), "price_per_mp": float(self.price_per_mp),
                "cost": float(self.cost)}


@dataclass(slots=True)
class Finished:
    data: bytes
    b64: str
    info: ImageInfo


def _check(image: GeneratedImage, max_pixels: int) -> ImageInfo:
    try:
        return inspect(image.data, max_pixels=max_pixels)
    except ImageCheckError as exc:
        raise ApiError(502, f"the upstream returned an unusable image: {exc}", code="upstream_bad_image") from None


def _convert(image: GeneratedImage, info: ImageInfo, request: ImageRequest, max_pixels: int) -> Finished:
    data = convert(image.data, info, to_format=request.output_format, compression=request.output_compression,
                   background=request.background, size=(request.width, request.height))
    return Finished(data, pybase64.b64encode(data).decode("ascii"), inspect(data, max_pixels=max_pixels))


async def finish_all(images: list[GeneratedImage], request: ImageRequest, max_pixels: int) -> list[Finished]:
    """Each image checked, then converted when its format, size or background is not what was asked.

    The client gets the size it asked (and pays) for: an upstream that answers another size (Gemini's
    fixed sizes per aspect ratio, say) is cropped to the asked aspect ratio and scaled.
    """
    out = []
    for image in images[: request.n]:
        info = _check(image, max_pixels)
        if needs_conversion(info, to_format=request.output_format, background=request.background,
                            size=(request.width, request.height)):
            # Decoding and re-encoding pixels takes milliseconds to seconds: off the event loop.
            out.append(await anyio.to_thread.run_sync(_convert, image, info, request, max_pixels))
        else:
            b64 = image.b64 if image.b64 is not None else pybase64.b64encode(image.data).decode("ascii")
            out.append(Finished(image.data, b64, info))  # untouched: reuse the upstream's own base64
    return out


async def response_items(
    finished: list[Finished], images: list[GeneratedImage], response_format: str,
    store: ArtifactStore, base_url: str, owner: str | None,
) -> list[dict[str, Any]]:
    items = []
    for done, image in zip(finished, images):
        item: dict[str, Any] = {}
        if response_format == "url":
            art = await store.put(done.data, content_type=f"image/{done.info.format}", width=done.info.width,
                                  height=done.info.height, owner=owner)
            item["url"] = base_url + store.signed_path(art)
            item["artifact_id"] = art.id
        else:
            item["b64_json"] = done.b64
        if image.revised_prompt:
            item["revised_prompt"] = image.revised_prompt
        item["seed"] = image.seed
        items.append(item)
    return items


def images_response(items: list[dict[str, Any]], finished: list[Finished], request: ImageRequest,
                    model_id: str, price: Price) -> dict[str, Any]:
    first = finished[0].info
    body: dict[str, Any] = {"created": int(time.time()), "data": items, "output_format": first.format,
                            "size": f"{first.width}x{first.height}", "model": model_id, "billing": price.body()}
    if request.quality:
        body["quality"] = request.quality
    if request.background:
        body["background"] = request.background
    return body
