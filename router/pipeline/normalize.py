"""Output normalization: check each upstream image, convert only when needed."""

from __future__ import annotations

from dataclasses import dataclass

import anyio.to_thread
import pybase64

from imagegate.providers.base import GeneratedImage, ImageRequest
from imagegate.providers.imaging import ImageCheckError, ImageInfo, convert, inspect, needs_conversion

from ..artifacts import Artifact
from ..errors import ApiError
from .json_parts import Base64Text


@dataclass(slots=True)
class DeliveredImage:
    """One image as the client gets it: checked bytes in the asked format and size, their base64,
    and what is known of it. `artifact` is set once it is stored (url answers, task results)."""

    data: bytes
    b64: Base64Text
    info: ImageInfo
    seed: int | None
    revised_prompt: str | None = None
    artifact: Artifact | None = None


def _check(image: GeneratedImage, max_pixels: int) -> ImageInfo:
    try:
        return inspect(image.data, max_pixels=max_pixels)
    except ImageCheckError as exc:
        raise ApiError(502, f"the upstream returned an unusable image: {exc}", code="upstream_bad_image") from None


def _convert(image: GeneratedImage, info: ImageInfo, request: ImageRequest, max_pixels: int) -> DeliveredImage:
    data = convert(image.data, info, to_format=request.output_format, compression=request.output_compression,
                   background=request.background, size=(request.width, request.height))
    return DeliveredImage(data, Base64Text(pybase64.b64encode(data)), inspect(data, max_pixels=max_pixels),
                          image.seed, image.revised_prompt)


async def finish_all(images: list[GeneratedImage], request: ImageRequest, max_pixels: int) -> list[DeliveredImage]:
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
            # Untouched: the upstream's own base64 passes through as it came.
            b64 = Base64Text(image.b64 if image.b64 is not None else pybase64.b64encode(image.data))
            out.append(DeliveredImage(image.data, b64, info, image.seed, image.revised_prompt))
    return out
