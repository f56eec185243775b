"""Cheap previews of a run in progress: the step's latents → a small RGB PNG, without the VAE decoder.

A linear map (latent channels + bias → RGB, one pixel per latent cell) approximates the decoder,
as InvokeAI and ComfyUI do with fixed per-family tables. Here the map is fitted once per loaded
model by encoding a few smooth colour fields with that model's own VAE and solving least squares,
so it matches the actual VAE (fine-tuned ones too) and any channel count, without copied tables.
Flux and Qwen-Image hand the step callback *packed* latents (B, tokens, C·4) that are unpacked with
the pipeline's own `_unpack_latents` first (docs/local-diffusers.md §3.8).
"""

from __future__ import annotations

import io
import logging
from typing import Any

import torch

from .jobs import Family

log = logging.getLogger("imagegate.local")
FIT_IMAGES = 8  # colour fields encoded to fit the map
FIT_LATENT_CELLS = 16  # their side, in latent cells


def _latent_space(vae: Any, family: Family) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) per channel such that the pipelines' latents are (z - shift) * scale for VAE output z."""
    config = vae.config
    channels = config.z_dim if family == "qwen-image" else config.latent_channels
    if family == "qwen-image":
        # QwenImagePipeline: latents = (z - latents_mean) / latents_std.
        return torch.tensor(config.latents_mean), 1.0 / torch.tensor(config.latents_std)
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:  # SDXL variants with a normalised latent space
        return torch.tensor(mean), config.scaling_factor / torch.tensor(std)
    shift = getattr(config, "shift_factor", None) or 0.0  # Flux shifts, SD does not
    return torch.full((channels,), float(shift)), torch.full((channels,), float(config.scaling_factor))


def _colour_fields(count: int, side: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random images in [-1, 1]: low-resolution noise scaled up, so each latent cell is near one colour."""
    coarse = torch.rand(count, 3, 4, 4, generator=generator) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)


@torch.no_grad()
def _encode(pipe: Any, family: Family, images: torch.Tensor) -> torch.Tensor:
    vae = pipe.vae
    dtype = next(vae.parameters()).dtype
    upcast = dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:  # as the SDXL pipeline does: its VAE overflows in fp16
        vae.to(torch.float32)
        dtype = torch.float32
    try:
        device = pipe._execution_device
        x = images.to(device=device, dtype=dtype)
        if family == "qwen-image":
            x = x[:, :, None]  # one frame: the Qwen-Image VAE is a video VAE
        z: torch.Tensor = vae.encode(x).latent_dist.mean
        return (z[:, :, 0] if family == "qwen-image" else z).float().cpu()
    finally:
        if upcast:
            vae.to(torch.float16)


class LatentPreviewer:
    """The fitted latent → RGB map of one loaded pipeline."""

    def __init__(self, weights: torch.Tensor, bias: torch.Tensor) -> None:
        self.weights, self.bias = weights, bias  # (C, 3), (3,)

    @classmethod
    def fit(cls, pipe: Any, family: Family) -> LatentPreviewer:
        scale_factor = int(pipe.vae_scale_factor)
        generator = torch.Generator().manual_seed(0)
        images = _colour_fields(FIT_IMAGES, FIT_LATENT_CELLS * scale_factor, generator)
        shift, scale = _latent_space(pipe.vae, family)
        z = _encode(pipe, family, images)
        latents = (z - shift.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1)
        # The target of each latent cell: the mean colour of the pixels it covers.
        target = torch.nn.functional.avg_pool2d(images, scale_factor)
        h, w = min(latents.shape[2], target.shape[2]), min(latents.shape[3], target.shape[3])
        x = latents[:, :, :h, :w].permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        y = target[:, :, :h, :w].permute(0, 2, 3, 1).reshape(-1, 3)
        x = torch.cat([x, torch.ones(len(x), 1)], dim=1)
        solution = torch.linalg.lstsq(x, y).solution
        if not torch.isfinite(solution).all():
            raise ValueError("the fitted preview map is not finite")
        return cls(solution[:-1].contiguous(), solution[-1].contiguous())

    @classmethod
    def fallback(cls, channels: int) -> LatentPreviewer:
        """A map that shows the first three channels (used when fitting failed)."""
        weights = torch.zeros(channels, 3)
        for i in range(min(3, channels)):
            weights[i, i] = 0.5
        return cls(weights, torch.zeros(3))

    def to_image(self, latents: torch.Tensor) -> torch.Tensor:
        """(C, h, w) pipeline-space latents → (h, w, 3) uint8."""
        x = latents.detach().float().cpu().permute(1, 2, 0)
        rgb = x @ self.weights + self.bias
        return ((rgb + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)


def unpack(pipe: Any, family: Family, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The callback's latents → (B, C, h, w): Flux and Qwen-Image pack 2×2 patches into tokens."""
    if family in ("flux", "qwen-image") and latents.dim() == 3:
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    if latents.dim() == 5:  # Qwen-Image: (B, C, frames=1, h, w)
        latents = latents[:, :, 0]
    return latents


def preview_png(previewer: LatentPreviewer, latents: torch.Tensor) -> bytes:
    """The first image of a batch as a PNG, one pixel per latent cell (1/8 of the image side on real models)."""
    from PIL import Image

    pixels = previewer.to_image(latents[0]).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def previewer_for(entry: Any) -> LatentPreviewer:
    """The entry's previewer, fitted on first use and kept with the loaded pipeline."""
    if entry.preview is None:
        family = entry.spec.family
        try:
            entry.preview = LatentPreviewer.fit(entry.base, family)
        except Exception as exc:  # a preview is a nicety: never fail the job for it
            log.warning("preview map for %s could not be fitted (%s); showing raw channels", entry.spec.name, exc)
            config = entry.base.vae.config
            entry.preview = LatentPreviewer.fallback(getattr(config, "latent_channels", None) or config.z_dim)
    previewer: LatentPreviewer = entry.preview
    return previewer


def preview_steps(partial_images: int, total: int) -> list[int]:
    """Which completed-step counts (1..total) get a preview: `partial_images` of them, evenly spaced."""
    steps: list[int] = []
    for k in range(1, partial_images + 1):
        step = max(round(k * total / (partial_images + 1)), steps[-1] + 1 if steps else 1)
        if step > total:
            break
        steps.append(step)
    return steps
