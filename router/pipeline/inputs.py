"""Input images: checked to be real images, and JSON image references (base64, data URI, artifact
id, URL) resolved to bytes. The surfaces read their bodies; this is what they share."""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
import pybase64

from imagegate.providers.base import InputImage
from imagegate.providers.imaging import ImageCheckError, inspect, transparent_edit_mask

from ..artifacts import ArtifactStore
from ..errors import ApiError, invalid
from ..fetch import Policy, fetch_image_url
from .asks import Inputs

MAX_INPUT_IMAGES = 16
_DATA_URI = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?(;[\w=.+-]+)*;base64,", re.ASCII)


def to_input(data: bytes, param: str, max_pixels: int) -> InputImage:
    try:
        info = inspect(data, max_pixels=max_pixels, decode=True)
    except ImageCheckError as exc:
        raise invalid(f"'{param}' is not a usable image: {exc}", param, code="invalid_image") from None
    return InputImage(data=data, format=info.format, width=info.width, height=info.height, has_alpha=info.has_alpha)


async def check_image(data: bytes, param: str, max_pixels: int) -> InputImage:
    # Full decode catches truncated files; it runs in a thread to keep the event loop free.
    return await anyio.to_thread.run_sync(to_input, data, param, max_pixels)


def decode_b64(text: str, param: str) -> bytes:
    match = _DATA_URI.match(text)
    payload = text[match.end():] if match else text
    if text.startswith("data:") and not match:
        raise invalid(f"'{param}' is a data URI that is not base64", param, code="invalid_base64")
    try:
        return pybase64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"'{param}' is not valid base64", param, code="invalid_base64") from None


async def resolve_input(ref: Any, param: str, store: ArtifactStore, max_pixels: int,
                        fetch: Policy | None = None, owner: str | None = None) -> tuple[InputImage, str | None]:
    """A JSON image reference — base64, data URI, artifact id, URL, or OpenAI's {image_url}/{file_id}
    object — checked, and the artifact id it named (None for the others: they are not stored yet).

    `fetch` None: URLs are refused (inputs.url_fetch false); otherwise they are fetched under that policy.
    `owner`: the caller's key id; another key's artifact is "not found" (None: auth off, one tenant).
    """
    if isinstance(ref, dict):
        keys = [k for k in ("image_url", "file_id") if ref.get(k)]
        if len(keys) != 1:
            raise invalid(f"'{param}' must have exactly one of image_url or file_id", param)
        ref = ref[keys[0]]
    if not isinstance(ref, str) or not ref:
        raise invalid(f"'{param}' must be a base64 string, a data URI or an artifact id", param)
    if ArtifactStore.valid_id(ref):
        found = await store.get(ref, owner)
        if found is None:
            raise ApiError(404, f"artifact '{ref}' not found", param=param, code="artifact_not_found")
        return await check_image(found[1], param, max_pixels), ref
    if ref[:8].lower().startswith(("http://", "https://")):
        if fetch is None:
            raise invalid(f"'{param}': image URLs are not accepted; upload it to /v1/uploads or send base64",
                          param, code="unsupported_image_url")
        return await check_image(await fetch_image_url(ref, param, fetch), param, max_pixels), None
    return await check_image(decode_b64(ref, param), param, max_pixels), None


@dataclass(slots=True)
class ImageRefs:
    """The image references of a JSON body, taken out before its other fields are validated (a URL
    is fetched only for a request that is otherwise valid)."""

    images: list[tuple[Any, str]] = field(default_factory=list)  # (reference, the field it came in)
    mask: Any = None

    @classmethod
    def take(cls, body: dict[str, Any]) -> ImageRefs:
        """`image` (one reference or a list) and `images` (a list), and `mask`; removed from `body`."""
        refs = cls()
        image = body.pop("image", None)
        if isinstance(image, list):
            refs.images += [(r, f"image[{i}]") for i, r in enumerate(image)]
        elif image is not None:
            refs.images.append((image, "image"))
        images = body.pop("images", None)
        if images is not None:
            if not isinstance(images, list):
                raise invalid("'images' must be a list of image references", "images")
            refs.images += [(r, f"images[{i}]") for i, r in enumerate(images)]
        if len(refs.images) > MAX_INPUT_IMAGES:
            raise invalid(f"at most {MAX_INPUT_IMAGES} input images", "image")
        refs.mask = body.pop("mask", None)
        return refs


    @classmethod
    def take_references(cls, body: dict[str, Any]) -> ImageRefs:
        """Seed 003's `image` (one, required) and `extra_images` (up to 15 more); removed from `body`."""
        refs = cls()
        image = body.pop("image", None)
        if image is None:
            raise invalid("'image' is required: the reference to start from", "image",
                          code="missing_required_parameter")
        refs.images.append((image, "image"))
        extra = body.pop("extra_images", None)
        if extra is not None:
            if not isinstance(extra, list):
                raise invalid("'extra_images' must be a list of image references", "extra_images")
            if len(extra) > MAX_INPUT_IMAGES - 1:
                raise invalid(f"at most {MAX_INPUT_IMAGES - 1} extra_images", "extra_images")
            refs.images += [(r, f"extra_images[{i}]") for i, r in enumerate(extra)]
        return refs


async def resolve_inputs(refs: ImageRefs, store: ArtifactStore, max_pixels: int, fetch: Policy | None = None,
                         owner: str | None = None) -> Inputs:
    inputs = Inputs()
    for ref, param in refs.images:
        image, artifact_id = await resolve_input(ref, param, store, max_pixels, fetch, owner)
        inputs.images.append(image)
        inputs.artifact_ids.append(artifact_id)
    if refs.mask is not None:
        inputs.mask = (await resolve_input(refs.mask, "mask", store, max_pixels, fetch, owner))[0]
    return check_mask(inputs)


def check_mask(inputs: Inputs) -> Inputs:
    mask = inputs.mask
    if mask is None:
        return inputs
    if not inputs.images:
        raise invalid("a mask needs an image", "image", code="missing_required_parameter")
    first = inputs.images[0]
    if (mask.width, mask.height) != (first.width, first.height):
        raise invalid(f"the mask is {mask.width}x{mask.height} but the image is {first.width}x{first.height}; "
                      "they must be the same size", "mask")
    if not mask.has_alpha:
        raise invalid("the mask needs an alpha channel (fully transparent pixels mark the area to edit)", "mask")
    return inputs


async def white_mask(data: bytes, param: str, size: tuple[int, int], invert: bool, max_pixels: int) -> InputImage:
    """A mask in A1111's convention (white = edit), checked, then converted once to the pipeline's
    (OpenAI's: transparent = edit) at the image's size."""
    await check_image(data, param, max_pixels)
    converted = await anyio.to_thread.run_sync(lambda: transparent_edit_mask(data, size, invert=invert))
    return await check_image(converted, param, max_pixels)
