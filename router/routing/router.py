"""Models, their routes, and serving a request by trying a model's routes in order.

Each route is retried (tenacity, in attempts.py) on retryable failures, then the next route is
tried. A route is skipped without a call when its provider cannot serve this request, its circuit
is open or its queue is full. Request errors and moderation end the request at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

import anyio

from imagegate.providers.base import ImageRequest, Provider, ProviderResult, UpstreamError

from ..config import Config, ModelConfig, RetryConfig
from ..errors import ApiError
from ..metrics import Metrics
from .attempts import RouteCaller, Trail
from .resilience import CircuitBreaker, Health, Latency, Limiter, LimiterFull

log = logging.getLogger("imagegate")


@dataclass(slots=True)
class ModelRoute:
    model_id: str
    index: int
    provider: Provider
    upstream_model: str
    options: dict[str, Any] = field(default_factory=dict)
    retry: RetryConfig = field(default_factory=RetryConfig)
    cost_per_mp: Decimal | None = None
    latency: Latency = field(default_factory=Latency)  # observed, for `auto: fastest`


@dataclass(slots=True)
class Served:
    result: ProviderResult
    route: ModelRoute


def _health(provider: Provider, metrics: Metrics) -> Health:
    opts, name = provider.options, provider.name
    in_flight, queued = metrics.in_flight.labels(name), metrics.queued.labels(name)

    def gauges() -> None:  # on every slot taken and given back
        in_flight.set(limiter.in_flight)
        queued.set(limiter.waiting)

    limiter = Limiter(opts.max_concurrency, opts.max_queue, gauges)
    breaker = CircuitBreaker(opts.circuit.failures, opts.circuit.cooldown_s,
                             lambda state: metrics.circuit.labels(name).set(int(state)))
    gauges()
    metrics.circuit.labels(name).set(0)
    return Health(breaker, limiter)


class ModelRouter:
    """Knows every model, alias and route; providers that are disabled have no routes."""

    def __init__(self, cfg: Config, providers: dict[str, Provider], metrics: Metrics) -> None:
        self.cfg, self.providers, self.metrics = cfg, providers, metrics
        self.health = {name: _health(p, metrics) for name, p in providers.items()}
        self.callers = {name: RouteCaller(p, self.health[name], metrics) for name, p in providers.items()}
        self.names: dict[str, str] = {}
        self.routes: dict[str, list[ModelRoute]] = {}
        for model_id, model in cfg.models.items():
            for name in [model_id, *model.aliases]:
                self.names[name] = model_id
            self.routes[model_id] = [
                ModelRoute(model_id, i, providers[r.provider], r.model, r.options, r.retry, r.cost_per_mp)
                for i, r in enumerate(model.routes) if r.provider in providers
            ]

    def resolve(self, name: str | None) -> str:
        """A model id from a name or alias; 404 for an unknown one."""
        if name is None:
            if self.cfg.default_model is None:
                raise ApiError(400, "model is required (no default_model is configured)", param="model",
                               code="missing_required_parameter")
            name = self.cfg.default_model
        model_id = self.names.get(name)
        if model_id is None:
            raise ApiError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return model_id

    def model(self, model_id: str) -> ModelConfig:
        return self.cfg.models[model_id]

    def capabilities(self, model_id: str) -> set[str]:
        """Declared capabilities, else what any of the model's routes can do."""
        declared = self.cfg.models[model_id].capabilities
        if declared is not None:
            return set(declared)
        return set().union(*(r.provider.capabilities for r in self.routes[model_id])) or {"generate"}

    def eligible(self, model_id: str, needs: set[str]) -> list[ModelRoute]:
        return [r for r in self.routes[model_id] if needs <= r.provider.capabilities]

    def available(self, model_id: str, request: ImageRequest, needs: set[str]) -> list[ModelRoute]:
        """Routes that could serve this very request now: capable, willing, circuit not open."""
        return [r for r in self.eligible(model_id, needs)
                if self.health[r.provider.name].breaker.available()
                and r.provider.unsupported(self.routed(r, request)) is None]

    def check_capable(self, model_id: str, needs: set[str]) -> None:
        missing = needs - self.capabilities(model_id)
        if missing:
            raise ApiError(400, f"model '{model_id}' does not support {', '.join(sorted(missing))}",
                           param="model", code="unsupported_capability")

    @staticmethod
    def routed(route: ModelRoute, request: ImageRequest) -> ImageRequest:
        return replace(request, upstream_model=route.upstream_model, route_options=route.options)

    async def serve(self, model_id: str, request: ImageRequest, needs: set[str], trail: Trail,
                    deadline: float | None = None) -> Served:
        """Try the eligible routes in order; fall back only when another route may succeed."""
        routes = self.eligible(model_id, needs)
        if not routes and self.routes[model_id]:
            # The model declares the capability, but none of its enabled routes' kinds has it.
            raise ApiError(400, f"no enabled route of model '{model_id}' can do {', '.join(sorted(needs))}",
                           param="model", code="unsupported_capability")
        if not routes:
            raise ApiError(503, f"no enabled route can serve model '{model_id}' now", code="no_healthy_route",
                           retry_after=30)
        deadline = anyio.current_time() + 3600 if deadline is None else deadline
        last: UpstreamError | None = None
        skipped: dict[str, list[str]] = {"unsupported": [], "circuit": [], "busy": []}
        retry_after: list[float] = []
        tried: ModelRoute | None = None
        for route in routes:
            name, routed = route.provider.name, self.routed(route, request)
            if reason := route.provider.unsupported(routed):
                skipped["unsupported"].append(f"{name}: {reason}")
                continue
            if not self.health[name].breaker.available():
                self._skip(name, "circuit_open", skipped["circuit"], retry_after,
                           self.health[name].breaker.retry_after())
                continue
            if tried is not None:
                self.metrics.fallbacks.labels(model_id, tried.provider.name, name).inc()
            tried = route
            try:
                result = await self.callers[name].call(routed, route.retry, route.latency, trail, deadline)
                return Served(result, route)
            except LimiterFull as exc:
                self._skip(name, "queue_full", skipped["busy"], retry_after, exc.retry_after)
            except UpstreamError as exc:
                log.warning("model %s route %d (%s) failed: %s", model_id, route.index, name, exc.code)
                if exc.code == "circuit_open":
                    skipped["circuit"].append(name)
                    retry_after.append(exc.retry_after or 1)
                    continue
                last = exc
                if not exc.fallback:
                    break
        raise self._failure(model_id, last, skipped, retry_after, trail)

    def _skip(self, name: str, reason: str, into: list[str], retry_after: list[float], seconds: float) -> None:
        self.metrics.rejections.labels(name, reason).inc()
        into.append(name)
        retry_after.append(seconds)

    @staticmethod
    def _failure(model_id: str, last: UpstreamError | None, skipped: dict[str, list[str]],
                 retry_after: list[float], trail: Trail) -> ApiError:
        headers = {"x-should-retry": "false"} if trail.paid else {}
        wait = min(retry_after) if retry_after else None
        if last is not None and not (last.retryable and (skipped["busy"] or skipped["circuit"])):
            error = ApiError.from_upstream(last)
            error.headers.update(headers)
            return error
        if skipped["busy"]:
            return ApiError(429, f"every route of model '{model_id}' is at capacity; try again shortly",
                            code="queue_full", retry_after=wait, headers=headers)
        if skipped["circuit"] or last is not None:
            return ApiError(503, f"no healthy route can serve model '{model_id}' now", code="no_healthy_route",
                            retry_after=wait or 30, headers=headers)
        return ApiError(400, f"no route of model '{model_id}' can serve this request "
                             f"({'; '.join(skipped['unsupported'])})", code="unsupported_by_upstream")
