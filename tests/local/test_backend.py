"""Generation through the DeviceWorker with tiny random pipelines of every family (CPU, offline).

Seeds, batching, edits sharing the loaded weights, previews, single-file loading, LoRAs, scheduler
swap and the load-time options. Failures, memory and the queue are in test_worker.py.
"""

from __future__ import annotations

import asyncio
import io
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from imagegate.local_backend.jobs import FAMILIES, ModelLoadError, ModelSpec
from imagegate.local_backend.pipelines import load_pipeline, resolve_dtype
from imagegate.local_backend.previews import preview_steps
from imagegate.local_backend.runner import inpaint_mask
from tests.local.support import SIDE, Blocker, make_job, mask_png, pixels, source_png

run = asyncio.run


def max_diff(a: bytes, b: bytes) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


@pytest.mark.parametrize("family", FAMILIES)
def test_a_seed_gives_the_same_pixels_and_other_seeds_differ(worker, models, family):
    spec = models.spec(family)
    one, two, other = (run(worker.run(make_job(spec, seed=seed))) for seed in (7, 7, 8))
    assert one.images[0] == two.images[0]  # bit-identical PNGs
    assert max_diff(one.images[0], other.images[0]) > 0
    assert pixels(one.images[0]).shape == (SIDE[family], SIDE[family], 3)
    assert (one.seeds, other.seeds) == ([7], [8])


@pytest.mark.parametrize("family", FAMILIES)
def test_jobs_waiting_together_run_as_one_call_and_match_separate_runs(worker, models, family):
    spec = models.spec(family)
    order: list[str] = []

    async def scenario():
        blocker = Blocker(spec)  # holds the thread so that both jobs are waiting when it frees up
        first = asyncio.create_task(worker.run(blocker.job))
        await asyncio.to_thread(blocker.started.wait, 30)
        a = asyncio.create_task(worker.run(make_job(spec, seed=10, n=2, on_progress=lambda *_: order.append("a"))))
        b = asyncio.create_task(worker.run(make_job(spec, seed=20, n=1, on_progress=lambda *_: order.append("b"))))
        while worker.queue_depth() < 2:
            await asyncio.sleep(0.005)
        blocker.release.set()
        await first
        return await a, await b

    batched_a, batched_b = run(scenario())
    assert order == ["a", "b", "a", "b"]  # both jobs step in the same call
    assert (batched_a.seeds, batched_b.seeds) == ([10, 11], [20])
    singles = [run(worker.run(make_job(spec, seed=seed))).images[0] for seed in (10, 11, 20)]
    for got, single in zip([*batched_a.images, *batched_b.images], singles, strict=True):
        assert max_diff(got, single) <= 1  # batched kernels agree to ~1e-6, not bitwise


def test_image_i_of_a_job_is_reproducible_from_seed_plus_i(worker, models):
    spec = models.spec("sdxl")
    many = run(worker.run(make_job(spec, seed=2**32 - 2, n=3)))
    assert many.seeds == [2**32 - 2, 2**32 - 1, 0]
    for image, seed in zip(many.images, many.seeds, strict=True):
        assert max_diff(image, run(worker.run(make_job(spec, seed=seed))).images[0]) <= 1


def test_a_job_larger_than_max_batch_runs_in_several_calls(worker, models):
    spec = models.spec("flux")
    progress: list[tuple[int, int]] = []
    big = run(worker.run(make_job(spec, seed=30, n=6, on_progress=lambda d, t: progress.append((d, t)))))
    assert len(big.images) == 6 and progress[-1] == (4, 4)  # two calls (4 + 2 images) of 2 steps
    assert max_diff(big.images[5], run(worker.run(make_job(spec, seed=35))).images[0]) <= 1


@pytest.mark.parametrize("family", FAMILIES)
def test_img2img_and_inpainting_share_the_loaded_weights(worker, models, family):
    spec, side = models.spec(family), SIDE[family]
    edit = {"operation": "edit", "image": source_png(side, side), "steps": 4, "seed": 3}
    img2img = run(worker.run(make_job(spec, strength=0.6, **edit)))
    assert run(worker.run(make_job(spec, strength=0.6, **edit))).images == img2img.images
    inpaint = run(worker.run(make_job(spec, mask=mask_png(side, side), strength=0.9, **edit)))
    assert pixels(inpaint.images[0]).shape == (side, side, 3)
    assert max_diff(img2img.images[0], inpaint.images[0]) > 0

    entry = worker.cache.peek(family)
    assert set(entry.views) == {"image2image", "inpaint"}
    assert type(entry.views["inpaint"]).__name__.endswith("InpaintPipeline")
    modules = {k: v for k, v in entry.base.components.items() if isinstance(v, torch.nn.Module)}
    for view in entry.views.values():
        for name, module in modules.items():
            assert view.components[name] is module  # the same weights, no second copy
        assert view._progress_bar_config.get("disable") is True


def test_openai_masks_become_diffusers_masks():
    mask = np.asarray(inpaint_mask(mask_png(16, 16), 16, 16))
    assert mask[8, 8] == 255 and mask[0, 0] == 0  # transparent (edit) → white (repaint)
    gray = io.BytesIO()
    Image.new("L", (8, 8), 255).save(gray, format="PNG")
    assert np.asarray(inpaint_mask(gray.getvalue(), 16, 16)).min() == 255  # no alpha: white = edit, resized


@pytest.mark.parametrize("family", FAMILIES)
def test_partial_images_are_previews_decoded_from_the_latents(worker, models, family):
    spec, side = models.spec(family), SIDE[family]
    previews: list[tuple[int, bytes, str]] = []
    job = make_job(spec, steps=6, partial_images=2,
                   on_preview=lambda i, png: previews.append((i, png, threading.current_thread().name)))
    assert job.batch_key() is None  # previews are never batched
    result = run(worker.run(job))
    assert [i for i, _, _ in previews] == [0, 1]
    assert all(thread.startswith("imagegate-") for _, _, thread in previews)  # sent from the worker, mid-run
    scale = worker.cache.peek(family).base.vae_scale_factor
    first, second = (Image.open(io.BytesIO(png)) for _, png, _ in previews)
    assert first.format == "PNG" and first.size == second.size == (side // scale, side // scale)
    assert np.abs(np.asarray(first, dtype=int) - np.asarray(second, dtype=int)).max() > 0  # steps 2 and 4
    assert len(result.images) == 1


def test_previews_are_spread_over_the_run():
    assert preview_steps(2, 10) == [3, 7]
    assert preview_steps(3, 4) == [1, 2, 3]
    assert preview_steps(3, 2) == [1, 2]  # never more previews than steps
    assert preview_steps(0, 10) == []


def test_a_request_the_pipeline_refuses_fails_alone(worker, models):
    with pytest.raises(ValueError, match="divisible by 8"):
        run(worker.run(make_job(models.spec("sd15"), width=60)))
    assert len(run(worker.run(make_job(models.spec("sd15")))).images) == 1


def test_a_single_file_checkpoint_loads_offline_with_a_config_dir(worker, models):
    spec = ModelSpec(name="sd15-file", family="sd15", path=models.single_file, config_dir=models.config_dir)
    from_file = run(worker.run(make_job(spec, seed=4)))
    from_dir = run(worker.run(make_job(models.spec("sd15"), seed=4)))
    assert from_file.images == from_dir.images  # the same weights, converted from the LDM layout
    assert load_pipeline(replace(spec, dtype="bfloat16"), "cpu").base.unet.dtype == torch.bfloat16
    no_config = ModelSpec(name="sd15-file-alone", family="sd15", path=models.single_file)
    with pytest.raises(ModelLoadError, match=r"sd15-file-alone.*config_dir"):
        run(worker.run(make_job(no_config)))


def test_a_lora_is_loaded_by_name_and_switched_per_job(worker, models):
    spec = models.spec("sd15", name="sd15-lora", loras=(("style", models.lora),))
    plain = run(worker.run(make_job(spec, seed=5))).images[0]
    styled = run(worker.run(make_job(spec, seed=5, lora="style"))).images[0]
    plain_again = run(worker.run(make_job(spec, seed=5))).images[0]
    assert max_diff(plain, styled) > 0
    assert max_diff(plain, plain_again) <= 1
    assert plain == run(worker.run(make_job(models.spec("sd15"), seed=5))).images[0]
    with pytest.raises(ValueError, match="no LoRA named 'nope'"):
        run(worker.run(make_job(spec, lora="nope")))
    missing = models.spec("sd15", name="sd15-lost-lora", loras=(("lost", models.root / "nowhere"),))
    with pytest.raises(ModelLoadError, match="'sd15-lost-lora': LoRA 'lost'"):
        run(worker.run(make_job(missing, lora="lost")))
    assert run(worker.run(make_job(missing, seed=5))).images[0] == plain  # the model itself is fine


def test_the_scheduler_is_swapped_by_class_name(worker, models):
    dpm = models.spec("sd15", name="sd15-dpm", scheduler="DPMSolverMultistepScheduler")
    swapped = run(worker.run(make_job(dpm, seed=1, steps=3))).images[0]
    assert type(worker.cache.peek("sd15-dpm").base.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert max_diff(swapped, run(worker.run(make_job(models.spec("sd15"), seed=1, steps=3))).images[0]) > 0
    for name, message in [("NoSuchScheduler", "not a diffusers scheduler"),
                          ("FlowMatchEulerDiscreteScheduler", "does not fit")]:
        with pytest.raises(ModelLoadError, match=message):
            run(worker.run(make_job(models.spec("sd15", name=f"sd15-{name}", scheduler=name))))


def test_dtype_defaults_and_views_keep_the_dtype(models):
    assert resolve_dtype(models.spec("sdxl"), "cpu") == torch.float32
    assert resolve_dtype(models.spec("sdxl"), "cuda:0") == torch.bfloat16
    entry = load_pipeline(models.spec("sd15", dtype="bfloat16"), "cpu")
    view = entry.view("image2image")
    assert view.unet is entry.base.unet and entry.base.unet.dtype == torch.bfloat16
    assert entry.nbytes < load_pipeline(models.spec("sd15"), "cpu").nbytes
    half = load_pipeline(models.spec("sdxl", dtype="float16"), "cpu").base
    assert half.unet.dtype == torch.float16 and half.vae.config.force_upcast  # the VAE decodes in fp32
    assert half.watermark is None and entry.base.safety_checker is None


def test_compile_is_regional_and_lazy(models):
    unet = load_pipeline(models.spec("sd15", compile=True), "cpu").base.unet
    blocks = [m for m in unet.modules() if type(m).__name__ in unet._repeated_blocks]
    assert blocks and all(block._compiled_call_impl is not None for block in blocks)
    assert unet._compiled_call_impl is None  # only the repeated blocks; nothing compiles until the first call


def test_vae_tiling_and_channels_last(worker, models):
    entry = load_pipeline(models.spec("sdxl"), "cpu")
    entry.set_tiling(2048, 1200)  # over 2 MP: tiled decode
    assert entry.base.vae.use_tiling
    entry.set_tiling(64, 64)
    assert not entry.base.vae.use_tiling
    assert load_pipeline(models.spec("sdxl", vae_tiling=True), "cpu").base.vae.use_tiling

    fast = models.spec("sd15", name="sd15-cl", channels_last=True)
    image = run(worker.run(make_job(fast, seed=6))).images[0]
    conv = worker.cache.peek("sd15-cl").base.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert max_diff(image, run(worker.run(make_job(models.spec("sd15"), seed=6))).images[0]) <= 1
