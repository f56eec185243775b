"""Prometheus metrics of the local diffusers backend, registered in the registry the gateway passes in.

Labels stay bounded: configured model names, the device, a fixed set of outcomes. Live-state gauges
use `multiprocess_mode="livesum"` like the router's own gauges (summed over live processes).

Device memory: `torch.cuda.memory_allocated(device)` on a CUDA device (bytes held by tensors, not the
allocator's reserve); on the CPU the process's resident set size (psutil, or /proc/self/statm),
since CPU weights live in ordinary process memory; 0 where neither is readable.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def device_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.memory_allocated(device))
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0


class BackendMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.loads = Counter("imagegate_local_pipeline_loads", "Pipeline loads by outcome (ok, error)",
                             ["model", "outcome"], registry=r)
        self.load_seconds = Histogram("imagegate_local_pipeline_load_seconds", "Time to load a pipeline",
                                      ["model"], buckets=LOAD_BUCKETS, registry=r)
        self.evictions = Counter("imagegate_local_pipeline_evictions", "Pipelines dropped from memory by reason",
                                 ["model", "reason"], registry=r)
        self.resident = Gauge("imagegate_local_resident_pipelines", "Pipelines loaded on the device",
                              ["device"], registry=r, multiprocess_mode="livesum")
        self.memory = Gauge("imagegate_local_device_memory_bytes",
                            "Device memory in use (CUDA: allocated by tensors; CPU: process RSS)",
                            ["device"], registry=r, multiprocess_mode="livesum")
        self.queue_depth = Gauge("imagegate_local_queue_depth", "Jobs waiting for the device worker",
                                 ["device"], registry=r, multiprocess_mode="livesum")
        self.step_seconds = Histogram("imagegate_local_step_seconds", "Seconds per denoising step (whole batch)",
                                      ["model"], buckets=STEP_BUCKETS, registry=r)
        self.images = Counter("imagegate_local_images", "Images generated", ["model"], registry=r)

    def update_memory(self, device: str) -> None:
        self.memory.labels(device).set(device_memory_bytes(device))
