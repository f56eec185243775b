"""`demo`: procedural images from prompt + seed. Deterministic, any size, no extra dependencies.

It is the embedded default model and what load tests run against: it exercises the whole
gateway path (validation, routing, output normalization) without a GPU or a network.
"""

from __future__ import annotations

import hashlib
import random

import anyio.to_thread
from PIL import Image, ImageDraw

from .base import GeneratedImage, ImageRequest, Provider, ProviderResult
from .imaging import encode, open_image
from .options import ProviderOptions

# Patterns are drawn on a small canvas and scaled up: cost barely grows with the output size.
_CANVAS = 256


def _palette(rng: random.Random) -> list[tuple[int, int, int]]:
    return [(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(8)]


def render(prompt: str, seed: int, width: int, height: int, *, transparent: bool = False) -> Image.Image:
    """The demo picture for (prompt, seed): the same inputs always give the same pixels."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    rng = random.Random(digest)
    colors = _palette(rng)
    scale = _CANVAS / max(width, height)
    cw, ch = max(1, round(width * scale)), max(1, round(height * scale))
    ramp = Image.linear_gradient("L").rotate(rng.uniform(0, 360), resample=Image.Resampling.BILINEAR)
    ramp = ramp.resize((cw, ch), Image.Resampling.BILINEAR)
    img = Image.composite(Image.new("RGB", (cw, ch), colors[0]), Image.new("RGB", (cw, ch), colors[1]), ramp)
    draw = ImageDraw.Draw(img)
    for color in colors[2 : 2 + rng.randint(3, 6)]:
        x, y = rng.uniform(0, cw), rng.uniform(0, ch)
        r = rng.uniform(0.05, 0.3) * max(cw, ch)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
    img = img.resize((width, height), Image.Resampling.BILINEAR)
    if transparent:
        alpha = Image.radial_gradient("L").resize((width, height), Image.Resampling.BILINEAR)
        img.putalpha(alpha.point(lambda v: 255 - v))
    return img


def _apply_edit(picture: Image.Image, request: ImageRequest) -> Image.Image:
    """Edits keep the first input visible: blended by strength, or kept outside the mask."""
    source = open_image(request.images[0].data).convert(picture.mode).resize(picture.size)
    if request.mask is not None:
        mask = open_image(request.mask.data).convert("RGBA").getchannel("A").resize(picture.size)
        # OpenAI convention: transparent (alpha 0) is the area to edit.
        return Image.composite(source, picture, mask)
    strength = 0.75 if request.strength is None else request.strength
    return Image.blend(source, picture, strength)


class DemoOptions(ProviderOptions):
    # Coarse previews when a client streams with partial_images, as a diffusion backend sends them
    # (so the web page shows live previews without a GPU); off, the kind has no previews.
    previews: bool = False


class DemoProvider(Provider):
    kind = "demo"
    honours = frozenset()
    capabilities = frozenset({"generate", "edit", "inpaint", "multi-reference", "transparent"})
    Options = DemoOptions
    options: DemoOptions

    def _make(self, request: ImageRequest, index: int) -> GeneratedImage:
        seed = request.seed_for(index)
        transparent = request.background == "transparent"
        picture = render(request.prompt, seed, request.width, request.height, transparent=transparent)
        if request.operation == "edit" and request.images:
            picture = _apply_edit(picture, request)
        data = encode(picture, request.output_format, compression=request.output_compression, png_level=1)
        return GeneratedImage(data=data, seed=seed)

    def _preview(self, request: ImageRequest, index: int) -> bytes:
        """A coarse rendering of the first image, finer with each index (8, 16, 32 … pixels wide)."""
        side = 8 * 2**index
        small = render(request.prompt, request.seed_for(0), side, max(1, side * request.height // request.width))
        return encode(small.resize((request.width, request.height)), "png", png_level=1)

    async def generate(self, request: ImageRequest) -> ProviderResult:
        # Pillow releases the GIL while encoding, so a worker thread keeps the event loop free.
        images = []
        for i in range(request.n):
            if i == 0 and self.options.previews and request.partial_images and request.on_partial is not None:
                # Previews as a diffusion backend sends them: here, the first image, coarse.
                for index in range(request.partial_images):
                    request.on_partial(index, await anyio.to_thread.run_sync(self._preview, request, index))
            images.append(await anyio.to_thread.run_sync(self._make, request, i))
            if request.on_progress is not None:
                request.on_progress(i + 1, request.n)
        return ProviderResult(images=images, metadata={"generator": "demo"})
