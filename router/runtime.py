"""How a serving process tunes its runtime: its event loop and HTTP parser, glibc's malloc before
anything is allocated, and Python's cyclic garbage collector once the app has started. `imagegate
serve` applies all of it, and so does each `--workers` process. The tests serve their in-process
gateways on the same loop and parser, and leave their own process's malloc and collector alone."""

from __future__ import annotations

import ctypes
import gc
import os

# mallopt(3): buffers up to 4 MB (one image's answer) from the heap, and freed heap kept up to
# 256 MB; bigger ones (n=4 answers) are mapped and unmapped, which keeps the heap from fragmenting.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD, TRIM_THRESHOLD = 4 << 20, 256 << 20

# What `imagegate serve` (and each --workers process) runs on: uvloop's event loop, and uvicorn's
# httptools protocol with the gateway's error shape (router/http/protocol.py), in place of
# asyncio's loop and h11. With the collector's tuning below, 15-25% less CPU a request at
# concurrency 32 on the pass-through (README, Performance).
SERVER_OPTIONS = {"loop": "uvloop", "http": "imagegate.router.http.protocol:GatewayHttpProtocol"}

# Container objects allocated (less those freed) before the youngest generation is collected;
# CPython's default is 700. Image bytes are not containers, so they do not count towards it, and
# what holds them is freed by reference counting when a request ends: the bench's memory cells
# did not move (README, Performance).
YOUNG_THRESHOLD = 10_000


def keep_freed_memory() -> None:
    """glibc's malloc: megabyte buffers (an image answer's) from the heap rather than fresh mappings,
    and freed memory kept for the next request rather than handed back to the kernel and faulted in
    again. A page faulted in costs microseconds (more on a VM): 1.7 ms of CPU per 1.6 MB image here
    (README, Performance). Worker processes read the same settings from the environment at start;
    an operator's own MALLOC_* values win."""
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(TRIM_THRESHOLD))
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    for option, name in ((M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_"), (M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_")):
        value = os.environ[name]
        if value.isdigit():
            libc.mallopt(option, int(value))


def freeze_startup_objects() -> None:
    """Once the app has started: what start-up made and keeps for the process's life (modules,
    classes, the configuration, the route table, the store's pools) is moved where the collector
    no longer walks it, and the youngest generation is collected less often. Otherwise every full
    collection walks those hundreds of thousands of objects again: a tenth of the gateway's CPU
    under load (README, Performance)."""
    gc.collect()  # what start-up left as garbage is freed, not frozen
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)
