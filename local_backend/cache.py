"""The pipelines resident on one device, kept by least-recently-used within a memory budget.

Sizes are parameter and buffer bytes: estimated from the weight files' headers before a load (so
room is made before the weights arrive) and measured from the modules after it. Evicting drops
every reference the cache holds (the views included), collects garbage and, on CUDA, returns the
allocator's cached blocks (docs/local-diffusers.md §0.6, §4.5). Used only from the worker thread.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable

import torch

from .jobs import ModelLoadError, ModelSpec
from .metrics import BackendMetrics
from .pipelines import LoadedPipeline, estimate_bytes, load_pipeline, resolve_dtype

log = logging.getLogger("imagegate.local")
Loader = Callable[[ModelSpec, str], LoadedPipeline]


GIB = 1024**3
WORKING_MEMORY_BYTES = 3 * GIB  # activations, VAE decode, allocator slack (InvokeAI's default working memory)


def default_budget(device: str) -> int:
    """The budget when none is configured: on CUDA the device's memory less working memory; on the
    CPU half the machine's RAM, as InvokeAI's RAM cache does. Never unbounded: without a budget
    nothing is ever evicted and the second large model runs the device out of memory."""
    if device.startswith("cuda"):
        total = int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
        return max(total - WORKING_MEMORY_BYTES, total // 2)
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(ram // 2 - 2 * GIB, 4 * GIB)


def free_device_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


class PipelineCache:
    def __init__(self, device: str, budget_bytes: int | None, metrics: BackendMetrics | None = None,
                 loader: Loader = load_pipeline) -> None:
        self.device, self.budget = device, budget_bytes
        self.metrics, self.loader = metrics, loader
        self._entries: OrderedDict[str, LoadedPipeline] = OrderedDict()

    def names(self) -> list[str]:
        """Resident models, least recently used first."""
        return list(self._entries)

    def resident_bytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def peek(self, name: str) -> LoadedPipeline | None:
        return self._entries.get(name)

    def get(self, spec: ModelSpec) -> LoadedPipeline:
        """The loaded pipeline of `spec`, loading it (and evicting others to make room) if needed."""
        entry = self._entries.get(spec.name)
        if entry is not None and entry.spec == spec:
            self._entries.move_to_end(spec.name)
            return entry
        if entry is not None:  # the model's configuration changed: load it afresh
            self.evict(spec.name, reason="reconfigured")
        self._make_room(estimate_bytes(spec, resolve_dtype(spec, self.device)), keep=None)
        entry = self._load(spec)
        self._entries[spec.name] = entry
        # The estimate may have been low (e.g. .bin files): settle the budget with the measured size.
        self._make_room(0, keep=spec.name)
        self._report()
        return entry

    def _load(self, spec: ModelSpec) -> LoadedPipeline:
        started = time.perf_counter()
        try:
            entry = self.loader(spec, self.device)
        except BaseException:
            if self.metrics:
                self.metrics.loads.labels(spec.name, "error").inc()
            raise  # the worker frees what a half-loaded pipeline held, once the traceback is gone
        seconds = time.perf_counter() - started
        log.info("loaded %s (%s, %.0f MB) on %s in %.2f s", spec.name, spec.family, entry.nbytes / 1e6,
                 self.device, seconds)
        if self.metrics:
            self.metrics.loads.labels(spec.name, "ok").inc()
            self.metrics.load_seconds.labels(spec.name).observe(seconds)
        return entry

    def _make_room(self, incoming: int, keep: str | None) -> None:
        if self.budget is None:
            return
        evicted = False
        while self._entries and self.resident_bytes() + incoming > self.budget:
            victim = next((name for name in self._entries if name != keep), None)
            if victim is None:
                break  # only the model in use is left: it stays, over budget if it must
            self._drop(victim, reason="budget")
            evicted = True
        if evicted:
            free_device_memory(self.device)
        if incoming and incoming > self.budget:
            log.warning("a model of %.0f MB is larger than the whole budget of %.0f MB; loading it anyway",
                        incoming / 1e6, self.budget / 1e6)

    def _drop(self, name: str, reason: str) -> None:
        entry = self._entries.pop(name)
        entry.release()
        log.info("evicted %s from %s (%s)", name, self.device, reason)
        if self.metrics:
            self.metrics.evictions.labels(name, reason).inc()

    def evict(self, name: str, reason: str = "request") -> bool:
        if name not in self._entries:
            return False
        self._drop(name, reason)
        free_device_memory(self.device)
        self._report()
        return True

    def evict_others(self, keep: str | None, reason: str) -> list[str]:
        """Drop every pipeline except `keep` (after an out-of-memory error) and free the device cache."""
        victims = [name for name in self._entries if name != keep]
        for name in victims:
            self._drop(name, reason)
        free_device_memory(self.device)
        self._report()
        return victims

    def clear(self) -> None:
        self.evict_others(None, reason="shutdown")

    def _report(self) -> None:
        if self.metrics:
            self.metrics.resident.labels(self.device).set(len(self._entries))
            self.metrics.update_memory(self.device)


def load_error(spec: ModelSpec, exc: BaseException) -> ModelLoadError:
    """A fresh ModelLoadError for a caller, with no traceback that pins the half-loaded pipeline."""
    if isinstance(exc, ModelLoadError):
        return ModelLoadError(str(exc))
    return ModelLoadError(f"model {spec.name!r} ({spec.family}, {spec.path}) failed to load: "
                          f"{type(exc).__name__}: {exc}")
