"""The synchronous requests running on this replica, per caller: how far each is, its latest
preview, and a way to interrupt it. What AUTOMATIC1111's /progress and /interrupt act on.

In-process, as A1111's own state is: a caller's requests on another replica are that replica's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import anyio

from imagegate.providers.base import ImageRequest

from .caller import Caller
from .delivery import ClientGone


class Interrupted(ClientGone):
    """The caller interrupted its own request; its work was cancelled and nothing was charged."""


@dataclass(eq=False)
class RunningJob:
    model_id: str
    started_at: float = field(default_factory=time.time)
    step: int = 0
    steps: int = 0
    preview: bytes | None = None  # the latest preview PNG, where the backend makes them
    interrupted: bool = False
    # The scope the request runs in: an interrupt cancels it (a scope costs nothing; a watcher task would).
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)

    @property
    def fraction(self) -> float:
        return self.step / self.steps if self.steps else 0.0


class JobBoard:
    def __init__(self) -> None:
        self._jobs: dict[str | None, list[RunningJob]] = {}

    @contextmanager
    def track(self, caller: Caller, model_id: str, request: ImageRequest) -> Iterator[RunningJob]:
        """Follow a request while it runs: its progress and previews feed the job."""
        job = RunningJob(model_id, steps=request.steps or 0)
        progress, partial = request.on_progress, request.on_partial

        def on_progress(step: int, total: int) -> None:
            job.step, job.steps = step, total
            if progress is not None:
                progress(step, total)

        def on_partial(index: int, png: bytes) -> None:
            job.preview = png
            if partial is not None:
                partial(index, png)

        request.on_progress, request.on_partial = on_progress, on_partial
        mine = self._jobs.setdefault(caller.owner, [])
        mine.append(job)
        try:
            yield job
        finally:
            mine.remove(job)
            if not mine:
                del self._jobs[caller.owner]

    def of(self, caller: Caller) -> list[RunningJob]:
        return list(self._jobs.get(caller.owner, []))

    def interrupt(self, caller: Caller) -> int:
        """Interrupt every running request of the caller; how many."""
        jobs = self.of(caller)
        for job in jobs:
            job.interrupted = True
            job.scope.cancel()
        return len(jobs)
