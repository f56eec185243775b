"""What the GPU worker takes and gives: plain dataclasses, no torch, so callers import them cheaply.

A `Job` is one validated request for one model: n images, image i from seed+i. The worker
reports progress and (when asked) intermediate previews through the job's callbacks, which it
calls from its own thread: they must be quick and thread-safe (the provider hands them to the
event loop).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Family = Literal["sd15", "sdxl", "flux", "qwen-image"]
FAMILIES: tuple[Family, ...] = ("sd15", "sdxl", "flux", "qwen-image")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One local model: where its weights are and how to run it. Built from the YAML."""

    name: str  # what routes call it (the route's `model:`)
    family: Family
    path: Path  # a diffusers directory, or a single-file checkpoint (.safetensors/.ckpt)
    config_dir: Path | None = None  # for a single file: a local diffusers config-only directory
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    offload: Literal["none", "model", "sequential"] = "none"
    compile: bool = False  # torch.compile of the denoiser (recompiles per size: see the README)
    scheduler: str | None = None  # a diffusers scheduler class name, e.g. "DPMSolverMultistepScheduler"
    vae_tiling: bool | None = None  # None: on for images over 2 MP
    channels_last: bool = False
    loras: tuple[tuple[str, Path], ...] = ()  # (name, path) LoRAs a request may ask for


@dataclass(slots=True)
class Job:
    spec: ModelSpec
    operation: Literal["generate", "edit"]
    prompt: str
    width: int
    height: int
    n: int
    seed: int  # image i uses (seed + i) mod 2**32, whatever else shares its batch
    steps: int
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    image: bytes | None = None  # edits: the source image (png/jpeg/webp bytes)
    mask: bytes | None = None  # inpainting: OpenAI convention, transparent = edit
    strength: float = 0.75
    lora: str | None = None
    partial_images: int = 0  # previews wanted during the run (0–3)
    on_progress: Callable[[int, int], None] | None = None  # (steps done, total steps)
    on_preview: Callable[[int, bytes], None] | None = None  # (preview index, PNG bytes)
    # Set by whoever gives up on the job (client gone, deadline): the worker stops at the next step.
    cancelled: threading.Event = field(default_factory=threading.Event)

    def seed_for(self, index: int) -> int:
        return (self.seed + index) % 2**32

    def batch_key(self) -> tuple[object, ...] | None:
        """Jobs with equal keys may run as one pipeline call; None: never batched (edits, previews)."""
        if self.operation != "generate" or self.partial_images or self.on_preview:
            return None
        # The whole spec, not its name: two routes may name one path with different schedulers.
        return (self.spec, self.width, self.height, self.steps, self.guidance_scale, self.negative_prompt,
                self.lora)


@dataclass(slots=True)
class Result:
    images: list[bytes]  # PNG bytes, in order
    seeds: list[int]
    seconds: float = 0.0


class JobCancelled(Exception):
    """The job's `cancelled` event was set; it stopped at a step boundary."""


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__("the worker's queue is full")
        self.retry_after = retry_after


class OutOfMemory(Exception):
    """The device ran out of memory for this job; the cache was emptied and the worker lives on."""


class ModelLoadError(Exception):
    """A model could not be loaded (missing or broken files, wrong family): the message says which."""
