"""Calling one route: its queue slot, its circuit, and tenacity's retries on retryable failures."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import anyio
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from imagegate.providers.base import ImageRequest, Provider, ProviderResult, UpstreamError

from ..config import RetryConfig
from ..metrics import Metrics
from .resilience import Health, Latency

log = logging.getLogger("imagegate")

# What each failure is, as `retry.on` names it and as the attempts metric counts it.
_BY_CODE = {"upstream_unavailable": "connect", "upstream_timeout": "timeout", "upstream_rate_limited": "429",
            "content_policy_violation": "moderated", "upstream_auth_failed": "auth",
            "upstream_bad_response": "bad_response", "upstream_download_failed": "bad_response",
            "upstream_no_image": "bad_response", "upstream_quota_exceeded": "quota"}
# Failures after which the upstream may have done (and billed) the work.
_PAID = {"timeout", "bad_response"}


def outcome(exc: UpstreamError) -> str:
    if exc.code in _BY_CODE:
        return _BY_CODE[exc.code]
    if exc.status == 429:
        return "429"
    if exc.retryable:
        return "5xx"
    return "rejected" if exc.status < 500 else "other"


@dataclass(slots=True)
class Trail:
    """What happened to one request across its routes: for `x-should-retry` and the fallback metric."""

    calls: int = 0
    paid: bool = False  # a call that may have cost money ran (and was cut off, or failed)


class RouteCaller:
    def __init__(self, provider: Provider, health: Health, metrics: Metrics) -> None:
        self.provider, self.health, self.metrics = provider, health, metrics
        self.name = provider.name
        # The children every call updates, looked up once (prometheus-client's `labels` costs more).
        self._succeeded = metrics.attempts.labels(self.name, "ok")
        self._upstream_latency = metrics.upstream_latency.labels(self.name)

    async def call(self, request: ImageRequest, retry: RetryConfig, latency: Latency, trail: Trail,
                   deadline: float) -> ProviderResult:
        """Try this route up to `retry.attempts` times; raises the last UpstreamError."""
        if retry.attempts == 1:  # the default: tenacity would call once and re-raise, at a cost per request
            return await self._once(request, latency, trail)

        def retryable(exc: BaseException) -> bool:
            return (isinstance(exc, UpstreamError) and exc.retryable and outcome(exc) in retry.on
                    and (exc.retry_after or 0) <= retry.max_retry_after_s)

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            hinted = exc.retry_after if isinstance(exc, UpstreamError) and exc.retry_after else 0.0
            ceiling = min(retry.max_backoff_s, retry.backoff_s * 2 ** (state.attempt_number - 1))
            return max(hinted, random.uniform(0, ceiling))  # full jitter, but never before Retry-After

        attempts = stop_after_attempt(retry.attempts)

        def stop(state: RetryCallState) -> bool:
            # Sleeping into the deadline helps no one: fall back to the next route instead.
            return attempts(state) or anyio.current_time() + (state.upcoming_sleep or 0) >= deadline

        retrying = AsyncRetrying(stop=stop,
                                 retry=retry_if_exception(retryable), wait=wait, reraise=True,
                                 before_sleep=lambda _: self.metrics.retries.labels(self.name).inc())
        async for attempt in retrying:
            with attempt:
                return await self._once(request, latency, trail)
        raise AssertionError("unreachable: tenacity re-raises the last failure")

    async def _once(self, request: ImageRequest, latency: Latency, trail: Trail) -> ProviderResult:
        breaker = self.health.breaker
        if not breaker.acquire():
            raise UpstreamError(f"{self.name}: circuit open", status=503, code="circuit_open", fallback=True,
                                retry_after=breaker.retry_after())
        verdict = False
        try:
            async with self.health.limiter.slot(self.health.latency.mean or 1.0):
                started = time.perf_counter()
                trail.calls += 1
                try:
                    result = await self.provider.generate(request)
                except anyio.get_cancelled_exc_class():
                    trail.paid = True  # cut off mid-call (deadline, shutdown): the upstream may have worked
                    raise
                finally:
                    self._upstream_latency.observe(time.perf_counter() - started)
            seconds = time.perf_counter() - started
            latency.observe(seconds)
            self.health.latency.observe(seconds)
            breaker.success()
            verdict = True
            self._succeeded.inc()
            return result
        except UpstreamError as exc:
            verdict = True
            self._failed(exc, trail)
            raise
        finally:
            if not verdict:
                breaker.abandon()  # cancelled, or the queue was full: no verdict on the upstream

    def _failed(self, exc: UpstreamError, trail: Trail) -> None:
        kind = outcome(exc)
        self.metrics.attempts.labels(self.name, kind).inc()
        self.health.last_error, self.health.last_error_at = exc.code, time.time()
        trail.paid = trail.paid or kind in _PAID
        # An upstream that answers "no" to a bad request or to moderation is alive; 429 means busy, not broken.
        if exc.fallback and kind != "429":
            self.health.breaker.failure()
        else:
            self.health.breaker.success()
        log.warning("provider %s failed: %s (%s)", self.name, exc.code, kind)
