"""How the local backend sizes its cache and groups its work: without `memory_budget_gb` the cache
still has a budget (so a second large model evicts the first instead of running the device out of
memory); OOMs are recognised in the forms CUDA raises them; batches never mix model settings."""

from __future__ import annotations

import os
from pathlib import Path

from imagegate.local_backend.cache import GIB, default_budget
from imagegate.local_backend.jobs import Job, ModelSpec
from imagegate.local_backend.pipelines import is_out_of_memory
from imagegate.local_backend.worker import DeviceWorker


def test_unset_budget_is_half_the_ram_on_the_cpu_never_unbounded() -> None:
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert default_budget("cpu") == max(ram // 2 - 2 * GIB, 4 * GIB)
    worker = DeviceWorker("cpu", memory_budget_gb=None, max_queue=4)
    assert worker.cache.budget == default_budget("cpu")
    assert DeviceWorker("cpu", memory_budget_gb=1.5, max_queue=4).cache.budget == int(1.5 * GIB)


def test_cuda_style_out_of_memory_errors_are_recognised() -> None:
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_out_of_memory(RuntimeError("size mismatch for conv_in.weight"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only what torch and CUDA raise


def test_jobs_of_one_model_name_with_different_settings_are_not_batched_together() -> None:
    euler = ModelSpec(name="sd", family="sd15", path=Path("/models/sd"), scheduler="EulerDiscreteScheduler")
    dpm = ModelSpec(name="sd", family="sd15", path=Path("/models/sd"), scheduler="DPMSolverMultistepScheduler")

    def job(spec: ModelSpec, seed: int) -> Job:
        return Job(spec=spec, operation="generate", prompt="p", width=64, height=64, n=1, seed=seed, steps=4)

    assert job(euler, 1).batch_key() == job(euler, 2).batch_key()  # seeds differ: still one call
    assert job(euler, 1).batch_key() != job(dpm, 1).batch_key()
