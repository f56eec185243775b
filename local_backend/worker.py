"""DeviceWorker: one executor thread per device in front of a bounded queue of jobs.

Every pipeline call, load and eviction of a device happens on its one thread, so two calls never run
at a time on one pipeline (a diffusers pipeline is not thread-safe, and model construction must not
overlap device moves; docs/local-diffusers.md §0.1, §1.4). The event loop only queues jobs and
awaits their futures. Waiting generate jobs with equal `batch_key()` are taken together and run as
one call of up to `max_batch` images. A failure fails only its own jobs: a model that cannot load,
an out-of-memory error (the other resident models are evicted and the device cache emptied), a
cancelled job; the thread lives on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .cache import GIB, PipelineCache, default_budget, free_device_memory, load_error
from .jobs import Job, JobCancelled, ModelLoadError, ModelSpec, OutOfMemory, QueueFull, Result
from .metrics import BackendMetrics
from .pipelines import LoadedPipeline, is_out_of_memory, resolve_device
from .runner import Stop, run_jobs

log = logging.getLogger("imagegate.local")


@dataclass(eq=False)
class _Item:
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)
    job: Job | None = None
    warm: ModelSpec | None = None  # a load-only item from warm()


def _strip(exc: BaseException) -> BaseException:
    """Drop the tracebacks of an exception and its chain: their frames pin the pipeline and its activations."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.__traceback__ = None
        current = current.__cause__ or current.__context__
    return exc


def _copy(exc: BaseException) -> BaseException:
    """One exception object per awaiting job (our own kinds are re-made; others are shared)."""
    if type(exc) in (JobCancelled, OutOfMemory, ModelLoadError):
        return type(exc)(*exc.args)
    return exc


class DeviceWorker:
    def __init__(self, device: str, *, memory_budget_gb: float | None, max_queue: int, max_batch: int = 4,
                 metrics: BackendMetrics | None = None) -> None:
        self.device = resolve_device(device)
        budget = default_budget(self.device) if memory_budget_gb is None else int(memory_budget_gb * GIB)
        self.cache = PipelineCache(self.device, budget, metrics)
        self.max_queue, self.max_batch, self.metrics = max_queue, max(1, max_batch), metrics
        self._items: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._busy = False
        self._running: list[Job] = []
        self._job_seconds = 10.0  # moving average of a batch's time: Retry-After when the queue is full

    async def start(self) -> None:
        if self._closed:
            raise RuntimeError(f"the {self.device} worker is closed")
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"imagegate-{self.device}", daemon=True)
            self._thread.start()

    async def run(self, job: Job) -> Result:
        await self.start()
        future = self._submit(_Item(job=job))
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            job.cancelled.set()  # stops at the next step, or is skipped if still waiting
            raise

    async def warm(self, specs: list[ModelSpec]) -> None:
        """Load `specs` now, in order, on the worker thread; one ModelLoadError lists every model that failed."""
        await self.start()
        items = [_Item(warm=spec) for spec in specs]
        with self._cond:
            self._items.extend(items)
            self._cond.notify()
        results = await asyncio.gather(*(asyncio.wrap_future(item.future) for item in items), return_exceptions=True)
        failures = [str(r) for r in results if isinstance(r, BaseException)]
        if failures:
            raise ModelLoadError("; ".join(failures))

    def queue_depth(self) -> int:
        with self._cond:
            return sum(1 for item in self._items if item.job is not None)

    async def aclose(self) -> None:
        with self._cond:
            self._closed = True
            pending, self._items = list(self._items), deque()
            for job in self._running:
                job.cancelled.set()
            self._cond.notify_all()
        for item in pending:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(JobCancelled("the device worker is shutting down"))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        await asyncio.to_thread(self.cache.clear)
        self._report_queue()

    # --- the event loop side ---

    def _submit(self, item: _Item) -> concurrent.futures.Future[Any]:
        with self._cond:
            if self._closed:
                raise RuntimeError(f"the {self.device} worker is closed")
            waiting = sum(1 for queued in self._items if queued.job is not None)
            if waiting >= self.max_queue and (waiting or self._busy):
                raise QueueFull(self._retry_after(waiting))
            self._items.append(item)
            self._cond.notify()
        self._report_queue()
        return item.future

    def _retry_after(self, waiting: int) -> int:
        return int(min(3600, max(1, math.ceil(self._job_seconds * (waiting + 1)))))

    def _report_queue(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.labels(self.device).set(self.queue_depth())

    # --- the worker thread ---

    def _loop(self) -> None:
        while True:
            items = self._next()
            if items is None:
                return
            self._report_queue()
            try:
                if items[0].warm is not None:
                    self._warm_one(items[0])
                else:
                    self._execute(items)
            except Exception as exc:  # a bug of ours must not kill the device's only thread
                log.exception("device worker %s: unexpected error", self.device)
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(_strip(exc))
            finally:
                with self._cond:
                    self._busy, self._running = False, []

    def _next(self) -> list[_Item] | None:
        """The next item, or the next job and the waiting jobs that can share its pipeline call."""
        with self._cond:
            while True:
                while not self._items and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                first = self._items.popleft()
                if self._claim(first):
                    break
            taken = [first]
            if first.job is not None:
                key, images = first.job.batch_key(), first.job.n
                for item in list(self._items):
                    job = item.job
                    if job is not None and job.batch_key() == key and images + job.n <= self.max_batch:
                        self._items.remove(item)
                        if self._claim(item):
                            taken.append(item)
                            images += job.n
            self._busy = True
            self._running = [item.job for item in taken if item.job is not None]
            return taken

    @staticmethod
    def _claim(item: _Item) -> bool:
        """Mark an item running; False if its awaiter gave up meanwhile (then it is answered and dropped)."""
        if not item.future.set_running_or_notify_cancel():
            return False
        if item.job is not None and item.job.cancelled.is_set():
            item.future.set_exception(JobCancelled("cancelled while waiting"))
            return False
        return True

    def _warm_one(self, item: _Item) -> None:
        spec = item.warm
        assert spec is not None  # a load-only item
        loaded = self._load(spec)
        if isinstance(loaded, BaseException):
            free_device_memory(self.device)  # whatever a half-loaded pipeline took
            item.future.set_exception(loaded)
        else:
            item.future.set_result(None)

    def _load(self, spec: ModelSpec) -> LoadedPipeline | BaseException:
        """`spec` made resident; a failure comes back as a fresh exception (no traceback pinning memory)."""
        try:
            return self.cache.get(spec)
        except Exception as exc:
            if is_out_of_memory(exc):
                return OutOfMemory(f"model {spec.name!r}: out of memory while loading")
            return load_error(spec, exc)

    def _attempt(self, spec: ModelSpec, jobs: list[Job]) -> list[list[bytes]] | BaseException:
        """Run the jobs; an error comes back as a fresh or traceback-free exception, not raised."""
        entry = self._load(spec)
        if isinstance(entry, BaseException):
            return entry
        step_seconds = self.metrics.step_seconds.labels(spec.name) if self.metrics else None
        try:
            return run_jobs(entry, jobs, self.max_batch, step_seconds.observe if step_seconds else lambda _: None)
        except Stop:
            return JobCancelled("cancelled")
        except Exception as exc:
            if is_out_of_memory(exc):
                return OutOfMemory(f"model {spec.name!r}: the {self.device} device ran out of memory "
                                   f"({jobs[0].width}x{jobs[0].height}, {sum(j.n for j in jobs)} images)")
            return _strip(exc)

    def _execute(self, items: list[_Item]) -> None:
        jobs = [item.job for item in items if item.job is not None]  # a batch: every item has a job
        spec = jobs[0].spec
        started = time.perf_counter()
        outcome = self._attempt(spec, jobs)
        seconds = time.perf_counter() - started
        if isinstance(outcome, OutOfMemory):
            # The failed call's tensors are unreferenced now: free the other models and the allocator's cache.
            log.warning("%s; evicting the other models and emptying the device cache", outcome)
            self.cache.evict_others(spec.name, reason="out_of_memory")
        elif isinstance(outcome, ModelLoadError):
            free_device_memory(self.device)  # whatever a half-loaded pipeline took
        elif not isinstance(outcome, BaseException):
            self._job_seconds = 0.7 * self._job_seconds + 0.3 * seconds
        for index, item in enumerate(items):
            self._settle(item, outcome if isinstance(outcome, BaseException) else outcome[index], seconds)
        if self.metrics:
            self.metrics.update_memory(self.device)

    def _settle(self, item: _Item, outcome: list[bytes] | BaseException, seconds: float) -> None:
        job = item.job
        assert job is not None  # only batches of jobs are settled
        if isinstance(outcome, BaseException):
            item.future.set_exception(_copy(outcome))
        elif job.cancelled.is_set():  # batched with jobs still wanted: ran to the end, but nobody waits
            item.future.set_exception(JobCancelled("cancelled"))
        else:
            if self.metrics:
                self.metrics.images.labels(job.spec.name).inc(len(outcome))
            item.future.set_result(Result(images=outcome, seeds=[job.seed_for(i) for i in range(job.n)],
                                          seconds=seconds))
