"""Shutting down gracefully: after SIGTERM new image requests are refused, and the deadlines of the
ones in flight are cut to the grace period so they end with a clean 503, not a dropped connection."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import anyio

from ..errors import ApiError

log = logging.getLogger("imagegate")


class Drain:
    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.draining = False
        self._in_flight: set[anyio.CancelScope] = set()

    def check_accepting(self) -> None:
        if self.draining:
            raise ApiError(503, "the gateway is shutting down; retry on another replica", code="shutting_down",
                           retry_after=1, headers={"connection": "close"})

    @contextmanager
    def tracked(self, scope: anyio.CancelScope) -> Iterator[None]:
        """Keep a request's deadline where `start` can shorten it."""
        self._in_flight.add(scope)
        try:
            yield
        finally:
            self._in_flight.discard(scope)

    async def start(self) -> None:
        """Refuse new image requests; in-flight ones get until the grace period ends (less a second
        to answer)."""
        self.draining = True
        cutoff = anyio.current_time() + max(0.0, self.grace_s - 1)
        for scope in self._in_flight:
            scope.deadline = min(scope.deadline, cutoff)
        log.warning("draining: %d requests in flight, %.0f s grace", len(self._in_flight), self.grace_s)
