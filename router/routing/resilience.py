"""Per provider instance: a circuit breaker, a fair bounded queue in front of a concurrency limit,
and the observed latency that `auto: fastest` orders by.

All of it is in-process state: each gateway process (and each uvicorn worker) keeps its own view of
its upstreams, as a client-side breaker does.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import IntEnum

import anyio


class State(IntEnum):
    # The numbers are what the `imagegate_circuit_state` gauge shows.
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Opens after `failures` consecutive failures; after `cooldown_s` lets one probe through
    (half-open); the probe's success closes it, its failure opens it for another cool-down."""

    def __init__(self, failures: int, cooldown_s: float, on_change: Callable[[State], None] = lambda _: None) -> None:
        self.threshold, self.cooldown_s = failures, cooldown_s
        self.on_change = on_change  # keeps the circuit gauge current
        self.state = State.CLOSED
        self.consecutive = 0
        self.opened_at = 0.0
        self._probing = False

    def _cooled(self) -> bool:
        return time.monotonic() - self.opened_at >= self.cooldown_s

    def available(self) -> bool:
        """Whether a request could be let through now (without taking the half-open probe)."""
        if self.state == State.OPEN:
            return self._cooled()
        return not (self.state == State.HALF_OPEN and self._probing)

    def acquire(self) -> bool:
        """Take permission for one call; in half-open only the single probe gets it."""
        if self.state == State.OPEN and self._cooled():
            self._set(State.HALF_OPEN)
        if self.state == State.OPEN or (self.state == State.HALF_OPEN and self._probing):
            return False
        if self.state == State.HALF_OPEN:
            self._probing = True
        return True

    def success(self) -> None:
        self.consecutive, self._probing = 0, False
        self._set(State.CLOSED)

    def failure(self) -> None:
        self.consecutive += 1
        self._probing = False
        if self.state == State.HALF_OPEN or self.consecutive >= self.threshold:
            self.opened_at = time.monotonic()
            self._set(State.OPEN)

    def _set(self, state: State) -> None:
        if state != self.state:
            self.state = state
            self.on_change(state)

    def abandon(self) -> None:
        """The call ended without a verdict (the client left): free the probe for the next one."""
        self._probing = False

    def retry_after(self) -> int:
        if self.state != State.OPEN:
            return 1
        return max(1, math.ceil(self.cooldown_s - (time.monotonic() - self.opened_at)))


class LimiterFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__("queue full")
        self.retry_after = retry_after


class Limiter:
    """`concurrency` calls at once; up to `max_queue` more wait, first come first served.

    anyio's Semaphore queues its waiters in order and drops a cancelled waiter from the line, so
    a client that disconnects (or runs out of time) leaves the queue at once.
    """

    def __init__(self, concurrency: int, max_queue: int, on_change: Callable[[], None] = lambda: None) -> None:
        self.concurrency, self.max_queue = concurrency, max_queue
        self._slots = anyio.Semaphore(concurrency)
        self.in_flight = 0
        self.waiting = 0
        self.on_change = on_change  # keeps the in-flight and queue gauges current

    @property
    def load(self) -> int:
        return self.in_flight + self.waiting

    @asynccontextmanager
    async def slot(self, seconds_per_call: float) -> AsyncIterator[None]:
        try:
            self._slots.acquire_nowait()  # a free slot (release hands slots to waiters first: still fair)
        except anyio.WouldBlock:
            await self._wait(seconds_per_call)
        self.in_flight += 1
        self.on_change()
        try:
            yield
        finally:
            self.in_flight -= 1
            self._slots.release()
            self.on_change()

    async def _wait(self, seconds_per_call: float) -> None:
        if self.waiting >= self.max_queue:
            ahead = (self.waiting + 1) / self.concurrency
            raise LimiterFull(max(1, math.ceil(ahead * max(seconds_per_call, 0.1))))
        self.waiting += 1
        self.on_change()
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
            self.on_change()  # also when the waiter gave up (cancelled): the queue gauge must drop


@dataclass(slots=True)
class Latency:
    """Exponentially weighted mean of successful call times (None until the first one)."""

    alpha: float = 0.2
    mean: float | None = None

    def observe(self, seconds: float) -> None:
        self.mean = seconds if self.mean is None else self.mean + self.alpha * (seconds - self.mean)


@dataclass(slots=True)
class Health:
    """Everything the router keeps about one provider instance."""

    breaker: CircuitBreaker
    limiter: Limiter
    latency: Latency = field(default_factory=Latency)
    last_error: str | None = None  # the code of the latest failure, for the operator's console
    last_error_at: float | None = None
