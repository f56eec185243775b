"""Models, their routes, and trying the routes of a model in order."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from providers.base import ImageRequest, Provider, ProviderResult, UpstreamError

from .config import Config, ModelConfig, RetryConfig
from .errors import ApiError

log = logging.getLogger("imagegate")


@dataclass(slots=True)
class Route:
    model_id: str
    index: int
    provider: Provider
    upstream_model: str
    options: dict[str, Any] = field(default_factory=dict)
    retry: RetryConfig = field(default_factory=RetryConfig)
    cost_per_mp: Decimal | None = None


@dataclass(slots=True)
class Served:
    result: ProviderResult
    route: Route


class Router:
    """Knows every model, alias and route; providers that are disabled have no routes."""

    def __init__(self, cfg: Config, providers: dict[str, Provider]) -> None:
        self.cfg = cfg
        self.providers = providers
        self.names: dict[str, str] = {}
        self.routes: dict[str, list[Route]] = {}
        for model_id, model in cfg.models.items():
            for name in [model_id, *model.aliases]:
                self.names[name] = model_id
            self.routes[model_id] = [
                Route(model_id, i, providers[r.provider], r.model, r.options, r.retry, r.cost_per_mp)
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

    def eligible(self, model_id: str, needs: set[str]) -> list[Route]:
        return [r for r in self.routes[model_id] if needs <= r.provider.capabilities]

    def check_capable(self, model_id: str, needs: set[str]) -> None:
        missing = needs - self.capabilities(model_id)
        if missing:
            raise ApiError(400, f"model '{model_id}' does not support {', '.join(sorted(missing))}",
                           param="model", code="unsupported_capability")

    async def serve(self, model_id: str, request: ImageRequest, needs: set[str]) -> Served:
        """Try the eligible routes in order; fall back only when another route may succeed."""
        routes = self.eligible(model_id, needs)
        if not routes:
            raise ApiError(503, f"no enabled route can serve model '{model_id}' now", code="no_healthy_route",
                           retry_after=30)
        last: UpstreamError | None = None
        for route in routes:
            routed = replace(request, upstream_model=route.upstream_model, route_options=route.options)
            try:
                return Served(await route.provider.generate(routed), route)
            except UpstreamError as exc:
                log.warning("model %s route %d (%s) failed: %s", model_id, route.index, route.provider.name, exc.code)
                last = exc
                if not exc.fallback:
                    break
        assert last is not None
        raise ApiError.from_upstream(last)
