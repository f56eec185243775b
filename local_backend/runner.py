"""One or more jobs of one model → pipeline calls → PNG bytes per job. Runs on the device worker's thread.

Jobs batched together share one call: the prompts are listed once per image and every image gets
its own CPU `torch.Generator` seeded seed+i, so image i depends only on its own seed (to ~1e-6, as a
batched kernel is not bitwise equal to a single one; docs/local-diffusers.md §0.4). A job with more
images than `max_batch` runs as several calls. The step callback reports progress, sends previews,
times the steps, and stops the call when every job in it has been cancelled: raising there aborts
before the VAE decode and leaves the pipeline reusable (docs/local-diffusers.md §3.8).
"""

from __future__ import annotations

import functools
import inspect
import io
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from .jobs import Job
from .pipelines import LoadedPipeline, Operation
from .previews import preview_png, preview_steps, previewer_for, unpack

log = logging.getLogger("imagegate.local")
Slot = tuple[Job, int]  # (job, image index within the job)
QWEN_TRUE_CFG = 4.0  # QwenImagePipeline's own default


class Stop(Exception):
    """Raised from the step callback: every job of the call was cancelled."""


def operation_of(job: Job) -> Operation:
    if job.operation == "generate" or job.image is None:
        return "text2image"
    return "inpaint" if job.mask is not None else "image2image"


def source_image(data: bytes, width: int, height: int) -> Any:
    from PIL import Image

    image: Image.Image = Image.open(io.BytesIO(data)).convert("RGB")
    return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)


def inpaint_mask(data: bytes, width: int, height: int) -> Any:
    """OpenAI's mask (transparent = edit) → diffusers' (white = repaint). Without alpha: taken as white = edit."""
    from PIL import Image, ImageOps

    mask: Image.Image = Image.open(io.BytesIO(data))
    if mask.mode in ("RGBA", "LA", "PA") or "transparency" in mask.info:
        mask = ImageOps.invert(mask.convert("RGBA").getchannel("A"))
    else:
        mask = mask.convert("L")
    return mask if mask.size == (width, height) else mask.resize((width, height), Image.Resampling.NEAREST)


@functools.cache
def _accepted(cls: type[Any]) -> frozenset[str]:
    return frozenset(inspect.signature(cls.__call__).parameters)


def family_kwargs(family: str, job: Job) -> dict[str, Any]:
    """Guidance and negative prompt in each family's own terms (None: the pipeline's default)."""
    kwargs: dict[str, Any] = {}
    if family == "qwen-image":
        # Qwen-Image's classifier-free guidance is true_cfg_scale, and it is on only with a negative prompt:
        # as the model card does, a blank negative prompt stands in when none is given.
        cfg = QWEN_TRUE_CFG if job.guidance_scale is None else job.guidance_scale
        kwargs["true_cfg_scale"] = cfg
        if cfg > 1 or job.negative_prompt is not None:
            kwargs["negative_prompt"] = job.negative_prompt or " "
        return kwargs
    if job.guidance_scale is not None:
        kwargs["guidance_scale"] = job.guidance_scale  # Flux: the distilled guidance (ignored by schnell)
    if job.negative_prompt is not None and family in ("sd15", "sdxl"):
        kwargs["negative_prompt"] = job.negative_prompt  # Flux would need true CFG: not offered
    return kwargs


def call_kwargs(entry: LoadedPipeline, view: Any, slots: list[Slot],
                callback: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    first = slots[0][0]
    kwargs: dict[str, Any] = {
        "prompt": [job.prompt for job, _ in slots],
        "num_images_per_prompt": 1,
        "generator": [torch.Generator("cpu").manual_seed(job.seed_for(i)) for job, i in slots],
        "width": first.width,
        "height": first.height,
        "num_inference_steps": first.steps,
        "output_type": "pil",
        "callback_on_step_end": callback,
        "callback_on_step_end_tensor_inputs": ["latents"],
        **family_kwargs(entry.spec.family, first),
    }
    if isinstance(kwargs.get("negative_prompt"), str):
        # One per prompt: some pipelines (Qwen-Image) encode a single string for a batch of one.
        kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * len(slots)
    if first.operation == "edit" and first.image is not None:
        kwargs["image"] = source_image(first.image, first.width, first.height)
        kwargs["strength"] = first.strength
        if first.mask is not None:
            kwargs["mask_image"] = inpaint_mask(first.mask, first.width, first.height)
    accepted = _accepted(view.__class__)
    return {k: v for k, v in kwargs.items() if k in accepted}


class StepCallback:
    """`callback_on_step_end` for call `index` of `calls`: progress, previews, step timing, cancellation."""

    def __init__(self, entry: LoadedPipeline, jobs: list[Job], index: int, calls: int,
                 on_step_seconds: Callable[[float], None]) -> None:
        self.entry, self.jobs, self.index, self.calls = entry, jobs, index, calls
        self.on_step_seconds = on_step_seconds
        self.last = time.perf_counter()
        self.first_step = True

    def __call__(self, pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        now = time.perf_counter()
        if not self.first_step:  # the first interval also holds the prompt encoding: not a step time
            self.on_step_seconds(now - self.last)
        self.first_step, self.last = False, now
        if all(job.cancelled.is_set() for job in self.jobs):
            raise Stop()
        per_call = int(getattr(pipe, "num_timesteps", 0) or self.jobs[0].steps)
        done, total = self.index * per_call + step + 1, self.calls * per_call
        for job in self.jobs:
            if job.on_progress is not None:
                _safely(job.on_progress, done, total)
            if job.partial_images and job.on_preview is not None and done in (plan := preview_steps(
                    job.partial_images, total)):
                self._preview(pipe, job, plan.index(done), tensors.get("latents"))
        self.last = time.perf_counter()  # callbacks and previews are not step time
        return {}

    def _preview(self, pipe: Any, job: Job, index: int, latents: Any) -> None:
        if latents is None:
            return
        try:
            family = self.entry.spec.family
            png = preview_png(previewer_for(self.entry), unpack(pipe, family, latents, job.width, job.height))
        except Exception:  # a failed preview must not fail the job
            log.exception("preview of %s failed", self.entry.spec.name)
            return
        _safely(job.on_preview, index, png)


def _safely(callback: Callable[..., None] | None, *args: Any) -> None:
    if callback is None:
        return
    try:
        callback(*args)
    except Exception:  # the caller's callbacks must not take the run down
        log.exception("a job callback failed")


def plan_calls(jobs: list[Job], max_batch: int) -> list[list[Slot]]:
    """Every image of every job, in order, cut into calls of at most max_batch images."""
    slots = [(job, i) for job in jobs for i in range(job.n)]
    size = max(1, max_batch)
    return [slots[i:i + size] for i in range(0, len(slots), size)]


def encode_png(image: Any) -> bytes:
    # Level 1: this runs on the device's thread between GPU calls; zlib's default level costs
    # ~180 ms on a 1024x1024 image (a few percent of an SDXL image) for ~10% fewer bytes.
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def run_jobs(entry: LoadedPipeline, jobs: list[Job], max_batch: int,
             on_step_seconds: Callable[[float], None] = lambda _: None) -> list[list[bytes]]:
    """Generate every image of `jobs` (same model, same batch key); PNG bytes per job, in seed order."""
    first = jobs[0]
    entry.use_lora(first.lora)
    entry.set_tiling(first.width, first.height)
    view = entry.view(operation_of(first))
    calls = plan_calls(jobs, max_batch)
    out: dict[int, list[bytes]] = {id(job): [] for job in jobs}
    for index, slots in enumerate(calls):
        members = list({id(job): job for job, _ in slots}.values())
        if all(job.cancelled.is_set() for job in members):
            raise Stop()  # between the calls of a large job
        callback = StepCallback(entry, members, index, len(calls), on_step_seconds)
        images = view(**call_kwargs(entry, view, slots, callback)).images
        for (job, _), image in zip(slots, images, strict=True):
            out[id(job)].append(encode_png(image))
    return [out[id(job)] for job in jobs]
