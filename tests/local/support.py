"""Helpers of the local backend tests: the tiny model set, job builders, PNG decoding, a blocking job."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

from imagegate.local_backend.jobs import FAMILIES, Job, ModelSpec
from tests.local import single_file, tiny

# Image side per family: SD latents are 1/2 of it (two VAE blocks); Flux/Qwen need multiples of 4 and pack 2x2.
SIDE = {"sd15": 64, "sdxl": 64, "flux": 32, "qwen-image": 32}


class TinyModels:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.dirs = {family: tiny.save_family(family, root / family) for family in FAMILIES}
        sd15 = tiny.build_sd15()
        self.single_file = single_file.save_single_file(sd15, root / "sd15-single.safetensors")
        self.config_dir = tiny.config_only_copy(self.dirs["sd15"], root / "sd15-config")
        self.lora = tiny.save_sd15_lora(sd15, root / "sd15-lora")
        self.broken = self._broken(root / "broken")

    def _broken(self, target: Path) -> Path:
        """An SD 1.5 directory whose weight files are garbage."""
        broken = tiny.config_only_copy(self.dirs["sd15"], target)
        for part in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"):
            (broken / f"{part}.safetensors").write_bytes(b"not a safetensors file")
        return broken

    def spec(self, family: str, **overrides: Any) -> ModelSpec:
        fields: dict[str, Any] = {"name": family, "family": family, "path": self.dirs[family], **overrides}
        return ModelSpec(**fields)


def make_job(spec: ModelSpec, **overrides: Any) -> Job:
    side = SIDE[spec.family]
    fields: dict[str, Any] = {"spec": spec, "operation": "generate", "prompt": "a red fox in the snow",
                              "width": side, "height": side, "n": 1, "seed": 0, "steps": 2, **overrides}
    return Job(**fields)


def pixels(png: bytes) -> Any:
    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB")).astype(np.int16)


class Blocker:
    """A job that holds the worker thread inside its first step until released (to line jobs up behind it)."""

    def __init__(self, spec: ModelSpec) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        self.job = make_job(spec, seed=999, on_progress=self._hold)

    def _hold(self, done: int, total: int) -> None:
        self.started.set()
        self.release.wait(timeout=30)


def source_png(width: int, height: int) -> bytes:
    """A source image for edits: a red square on blue."""
    from PIL import Image

    image = Image.new("RGB", (width, height), (30, 60, 200))
    image.paste((220, 40, 40), (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return _png(image)


def mask_png(width: int, height: int) -> bytes:
    """An OpenAI mask: opaque everywhere except a transparent (= edit) centre square."""
    from PIL import Image

    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return _png(mask)


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
