"""The DeviceWorker under failure and pressure: cancellation, broken models, out-of-memory, the LRU
memory budget, a full queue, warm-up and metrics. Tests that evict or fill a worker make their own."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

from imagegate.local_backend.cache import GIB
from imagegate.local_backend.jobs import JobCancelled, ModelLoadError, ModelSpec, OutOfMemory, QueueFull
from imagegate.local_backend.metrics import BackendMetrics
from imagegate.local_backend.pipelines import estimate_bytes
from imagegate.local_backend.worker import DeviceWorker
from tests.local.support import SIDE, Blocker, make_job, source_png

run = asyncio.run


def own_worker(**options: Any) -> tuple[DeviceWorker, CollectorRegistry]:
    registry = CollectorRegistry()
    settings: dict[str, Any] = {"memory_budget_gb": None, "max_queue": 8, **options}
    return DeviceWorker("auto", metrics=BackendMetrics(registry), **settings), registry


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_cancelling_mid_run_stops_at_the_next_step_and_the_pipeline_stays_usable(worker, models):
    spec = models.spec("sd15")
    clean = run(worker.run(make_job(spec, steps=10, seed=12)))
    seen: list[int] = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        if done == 2:
            job.cancelled.set()

    job = make_job(spec, steps=10, seed=12, on_progress=progress)
    with pytest.raises(JobCancelled):
        run(worker.run(job))
    assert seen == [1, 2]  # stopped at the step after the flag: 8 steps and the decode skipped
    assert run(worker.run(make_job(spec, steps=10, seed=12))).images == clean.images


def test_a_cancelled_awaiter_cancels_its_job_waiting_or_running(worker, models):
    spec = models.spec("flux")
    seen: list[int] = []
    in_step, go_on = threading.Event(), threading.Event()

    def progress(done: int, total: int) -> None:
        seen.append(done)
        in_step.set()
        go_on.wait(timeout=30)  # hold step 1 until the awaiter has given up

    async def scenario() -> None:
        blocker = Blocker(spec)
        first = asyncio.create_task(worker.run(blocker.job))
        await asyncio.to_thread(blocker.started.wait, 30)
        waiting = make_job(spec)
        task = asyncio.create_task(worker.run(waiting))
        while worker.queue_depth() < 1:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert waiting.cancelled.is_set()
        blocker.release.set()
        await first
        running = make_job(spec, steps=50, on_progress=progress)
        task = asyncio.create_task(worker.run(running))
        await asyncio.to_thread(in_step.wait, 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert running.cancelled.is_set()
        go_on.set()
        while worker._busy:  # the thread notices the flag at its next step
            await asyncio.sleep(0.005)

    run(scenario())
    assert seen == [1]  # the next step's callback saw the flag and stopped the run


def test_a_broken_model_is_reported_by_name_and_the_worker_serves_others(worker, models, registry):
    broken = ModelSpec(name="broken-model", family="sd15", path=models.broken)
    with pytest.raises(ModelLoadError) as caught:
        run(worker.run(make_job(broken)))
    assert "broken-model" in str(caught.value) and str(models.broken) in str(caught.value)
    assert value(registry, "imagegate_local_pipeline_loads_total", model="broken-model", outcome="error") == 1
    cases = [(ModelSpec(name="ghost", family="sd15", path=models.root / "nowhere"), "'ghost'.*does not exist"),
             (ModelSpec(name="mislabelled", family="sdxl", path=models.dirs["flux"]), "'mislabelled'.*FluxPipeline"),
             (ModelSpec(name="not-diffusers", family="sd15", path=models.root), "'not-diffusers'.*model_index")]
    for spec, message in cases:
        with pytest.raises(ModelLoadError, match=message):
            run(worker.run(make_job(spec)))
    assert "broken-model" not in worker.cache.names()
    assert len(run(worker.run(make_job(models.spec("sd15")))).images) == 1


def test_out_of_memory_fails_that_job_empties_the_cache_and_the_next_job_works(models, monkeypatch):
    from diffusers import UNet2DConditionModel

    def out_of_memory(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    w, registry = own_worker()
    sd15, flux = models.spec("sd15"), models.spec("flux")

    async def scenario() -> tuple[Any, ...]:
        before = await w.run(make_job(sd15, seed=2))
        await w.run(make_job(flux))
        flux_pipe = weakref.ref(w.cache.peek("flux").base)
        with monkeypatch.context() as patch:
            patch.setattr(UNet2DConditionModel, "forward", out_of_memory)
            with pytest.raises(OutOfMemory, match="'sd15'"):
                await w.run(make_job(sd15, seed=2))
        resident = w.cache.names()
        after = await w.run(make_job(sd15, seed=2))
        await w.aclose()
        return before, after, resident, flux_pipe

    before, after, resident, flux_pipe = run(scenario())
    assert resident == ["sd15"]  # the other model was evicted to make room
    gc.collect()
    assert flux_pipe() is None
    assert after.images == before.images
    assert value(registry, "imagegate_local_pipeline_evictions_total", model="flux", reason="out_of_memory") == 1


def test_least_recently_used_pipelines_are_evicted_to_stay_within_the_budget(models):
    sd15, flux, sdxl = models.spec("sd15"), models.spec("flux"), models.spec("sdxl")
    sizes = {spec.name: estimate_bytes(spec, torch.float32) for spec in (sd15, flux, sdxl)}
    budget = sizes["sdxl"] + max(sizes["sd15"], sizes["flux"]) // 2  # room for one model at a time
    w, registry = own_worker(memory_budget_gb=budget / GIB)
    side = SIDE["sd15"]

    async def scenario() -> tuple[list[str], list[weakref.ref], list[str]]:
        await w.run(make_job(sd15, operation="edit", image=source_png(side, side), strength=0.5, steps=3))
        entry = w.cache.peek("sd15")
        refs = [weakref.ref(entry.base), weakref.ref(entry.views["image2image"]), weakref.ref(entry.base.unet)]
        del entry
        await w.run(make_job(flux))
        after_flux = w.cache.names()
        await w.run(make_job(sdxl))
        await w.run(make_job(flux))
        order = w.cache.names()
        await w.aclose()
        return after_flux, refs, order

    after_flux, refs, order = run(scenario())
    assert after_flux == ["flux"]
    gc.collect()
    assert all(ref() is None for ref in refs)  # the pipeline, its view and its weights are gone
    assert order == ["flux"]
    assert value(registry, "imagegate_local_pipeline_evictions_total", model="sd15", reason="budget") == 1
    assert value(registry, "imagegate_local_pipeline_loads_total", model="flux", outcome="ok") == 2


def test_a_full_queue_is_refused_with_retry_after(models):
    w, registry = own_worker(max_queue=1)
    spec = models.spec("flux")

    async def scenario() -> None:
        blocker = Blocker(spec)
        first = asyncio.create_task(w.run(blocker.job))
        await asyncio.to_thread(blocker.started.wait, 30)
        queued = asyncio.create_task(w.run(make_job(spec)))
        while w.queue_depth() < 1:
            await asyncio.sleep(0.005)
        with pytest.raises(QueueFull) as caught:
            await w.run(make_job(spec))
        assert caught.value.retry_after >= 1
        assert value(registry, "imagegate_local_queue_depth", device="cpu") == 1
        blocker.release.set()
        await first
        assert len((await queued).images) == 1
        await w.aclose()

    run(scenario())
    assert w.queue_depth() == 0 and value(registry, "imagegate_local_queue_depth", device="cpu") == 0


def test_warm_loads_models_now_and_names_those_that_failed(models):
    w, registry = own_worker()
    broken = ModelSpec(name="broken-model", family="sd15", path=models.broken)

    async def scenario() -> list[str]:
        await w.warm([models.spec("sd15")])
        with pytest.raises(ModelLoadError, match="broken-model"):
            await w.warm([models.spec("flux"), broken])
        names = w.cache.names()
        await w.aclose()
        return names

    assert run(scenario()) == ["sd15", "flux"]
    assert value(registry, "imagegate_local_resident_pipelines", device="cpu") == 0  # released on close


def test_metrics_follow_loads_steps_images_and_memory(models):
    w, registry = own_worker()
    spec = models.spec("qwen-image")

    async def scenario() -> float | None:
        await w.run(make_job(spec, n=2, steps=3))
        await w.run(make_job(spec, n=1, steps=3))
        resident = value(registry, "imagegate_local_resident_pipelines", device="cpu")
        await w.aclose()
        return resident

    assert w.device == "cpu"
    assert run(scenario()) == 1
    assert value(registry, "imagegate_local_pipeline_loads_total", model="qwen-image", outcome="ok") == 1
    assert value(registry, "imagegate_local_pipeline_load_seconds_count", model="qwen-image") == 1
    assert value(registry, "imagegate_local_images_total", model="qwen-image") == 3
    assert value(registry, "imagegate_local_step_seconds_count", model="qwen-image") == 4  # 2 calls × (3 - 1)
    assert value(registry, "imagegate_local_device_memory_bytes", device="cpu") > 0  # process RSS on the CPU
    assert value(registry, "imagegate_local_queue_depth", device="cpu") == 0
