"""Image checks and conversions with Pillow, shared by the router and the adapters.

Every image that crosses the gateway (client inputs, upstream outputs) goes through `inspect`:
magic bytes first, then Pillow restricted to an allow-list of formats, a pixel cap checked from
the header before anything is decoded (no decompression bombs), then a structural check.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError
from zlib_ng.zlib_ng import crc32

# Pillow's own bomb guard stays on as a backstop; our explicit cap below is the real limit.
Image.MAX_IMAGE_PIXELS = 100_000_000

FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
PIL_NAMES = {v: k for k, v in FORMATS.items()}
DEFAULT_MAX_PIXELS = 50_000_000
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


class ImageCheckError(ValueError):
    """The bytes are not an acceptable image; the message is safe to show a client."""


@dataclass(frozen=True, slots=True)
class ImageInfo:
    format: str  # png | jpeg | webp
    width: int
    height: int
    mode: str
    has_alpha: bool


def sniff_format(data: bytes) -> str | None:
    """The format from magic bytes alone, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in _ALPHA_MODES or "transparency" in img.info


def inspect(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, decode: bool = False) -> ImageInfo:
    """Check that `data` is a PNG, JPEG or WebP image within the pixel cap.

    `decode=False` parses headers and verifies the structure (PNG chunk CRCs) without decoding
    pixels: cheap enough for every upstream output. `decode=True` decodes fully, which also
    catches truncated JPEG/WebP data; used for client inputs.
    """
    if sniff_format(data) is None:
        raise ImageCheckError("not a PNG, JPEG or WebP image")
    try:
        with Image.open(io.BytesIO(data), formats=list(FORMATS)) as img:
            width, height = img.size
            if width < 1 or height < 1 or width * height > max_pixels:
                raise ImageCheckError(f"image of {width}x{height} pixels is over the limit of {max_pixels} pixels")
            info = ImageInfo(FORMATS[str(img.format)], width, height, img.mode, _has_alpha(img))
            if decode:
                img.load()
            elif info.format == "png":
                _png_whole(data)
            else:
                img.verify()
    except ImageCheckError:
        raise
    except Image.DecompressionBombError as exc:
        # Pillow's backstop fires in `open` for headers far over the cap, before our own check.
        raise ImageCheckError("image dimensions are over the pixel limit") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageCheckError("image data is corrupt or truncated") from exc
    return info


def _png_whole(data: bytes) -> None:
    """Every chunk of a PNG present and its CRC right, through IEND (what Pillow's `verify` checks,
    with zlib-ng's CRC: a twentieth of the time of zlib's on a megabyte image)."""
    view, pos = memoryview(data), 8
    while True:
        if pos + 12 > len(view):
            raise ImageCheckError("image data is corrupt or truncated")
        length = int.from_bytes(view[pos:pos + 4])
        end = pos + 8 + length
        if end + 4 > len(view) or crc32(view[pos + 4:end]) != int.from_bytes(view[end:end + 4]):
            raise ImageCheckError("image data is corrupt or truncated")
        if bytes(view[pos + 4:pos + 8]) == b"IEND":
            return
        pos = end + 4


def open_image(data: bytes) -> Image.Image:
    """Decode bytes already passed through `inspect`."""
    img = Image.open(io.BytesIO(data), formats=list(FORMATS))
    img.load()
    return img


def encode(img: Image.Image, fmt: str, *, compression: int | None = None, png_level: int = 6) -> bytes:
    """Encode to png/jpeg/webp. `compression` is OpenAI's 0–100 (100 = best quality)."""
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG", compress_level=png_level)
    else:
        quality = 95 if compression is None else max(1, min(100, compression))
        if fmt == "jpeg" and img.mode not in ("RGB", "L"):
            img = flatten(img)
        img.save(buf, PIL_NAMES[fmt], quality=quality)
    return buf.getvalue()


def flatten(img: Image.Image, color: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Composite an image with transparency onto an opaque background."""
    if not _has_alpha(img):
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    base = Image.new("RGB", rgba.size, color)
    base.paste(rgba, mask=rgba.getchannel("A"))
    return base


def needs_conversion(info: ImageInfo, *, to_format: str, background: str | None,
                     size: tuple[int, int] | None = None) -> bool:
    flatten_alpha = background == "opaque" and info.has_alpha
    wrong_size = size is not None and (info.width, info.height) != size
    return info.format != to_format or flatten_alpha or wrong_size


def convert(
    data: bytes, info: ImageInfo, *, to_format: str, compression: int | None, background: str | None,
    size: tuple[int, int] | None = None,
) -> bytes:
    """Re-encode only when the format, the size or (for an opaque result) the alpha must change.

    A wrong size is fixed by cropping to the asked aspect ratio around the centre, then scaling.
    """
    if not needs_conversion(info, to_format=to_format, background=background, size=size):
        return data
    img = open_image(data)
    if size is not None and img.size != size:
        img = ImageOps.fit(img, size, Image.Resampling.LANCZOS)
    if background == "opaque" and info.has_alpha:
        img = flatten(img)
    return encode(img, to_format, compression=compression)


def white_edit_mask(mask: bytes) -> bytes:
    """An OpenAI mask (transparent = edit) as the grayscale mask A1111 and BFL Fill take (white = edit).

    Alpha below half counts as transparent, so anti-aliased mask edges land on the side they lean to.
    """
    alpha = open_image(mask).convert("RGBA").getchannel("A")
    return encode(alpha.point(lambda a: 255 if a < 128 else 0), "png", png_level=1)


def transparent_edit_mask(mask: bytes, size: tuple[int, int], *, invert: bool = False) -> bytes:
    """An A1111 mask (white = edit; or, when it has real transparency, opaque = edit) as OpenAI's
    (transparent = edit), at `size`. `invert` is A1111's `inpainting_mask_invert`. As A1111's own
    create_binary_mask: over half counts as edit."""
    image = open_image(mask)
    if image.mode in ("RGBA", "LA") and image.getchannel("A").getextrema() != (255, 255):
        level = image.getchannel("A")
    else:
        level = image.convert("L")
    if level.size != size:
        level = level.resize(size, Image.Resampling.NEAREST)
    edit = level.point(lambda v: 255 if (v > 128) != invert else 0)
    out = Image.new("RGBA", size, (0, 0, 0, 255))
    out.putalpha(edit.point(lambda v: 0 if v else 255))
    return encode(out, "png", png_level=1)
