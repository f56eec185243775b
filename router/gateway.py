"""The running gateway: configuration, providers, router, artifact store and metrics in one place."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import Response

from imagegate.providers import registry
from imagegate.providers.base import Provider

from .artifacts import ArtifactStore, load_or_create_secret
from .config import Config
from .errors import ApiError
from .metrics import Metrics
from .output import Price
from .routing import Route, Router
from .schemas import GenerationBody
from .state import Store, open_store
from .validation import Inputs, Prepared, check_extra_fields, prepare

if TYPE_CHECKING:
    from .tasks import TaskRunner

log = logging.getLogger("imagegate")
STALE_HOLD_GRACE_S = 60.0  # added to server.request_timeout_s before a hold counts as abandoned


class JSONResponse(Response):
    """orjson: response bodies carry megabytes of base64."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _disabled_reason(name: str, provider: Provider, cfg: Config) -> str | None:
    if not provider.options.enabled:
        return "enabled: false"
    unset = sorted({env for path, env in cfg.unset_env if path.startswith(f"providers.{name}.")})
    if unset:
        return f"{', '.join(unset)} not set"
    missing = provider.missing_settings()
    return f"missing {', '.join(missing)}" if missing else None


class Gateway:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.all_providers = {name: registry.create(name, raw) for name, raw in cfg.providers.items()}
        for provider in self.all_providers.values():
            provider.bind_metrics(self.metrics.registry)
        self.disabled: dict[str, str] = {}
        for name, provider in self.all_providers.items():
            reason = _disabled_reason(name, provider, cfg)
            if reason:
                self.disabled[name] = reason
        self.providers = {n: p for n, p in self.all_providers.items() if n not in self.disabled}
        self.router = Router(cfg, self.providers, self.metrics)
        art_dir = Path(cfg.artifacts.dir)
        self.artifacts = ArtifactStore(art_dir, cfg.artifacts.ttl_hours,
                                       load_or_create_secret(cfg.auth.signing_secret, art_dir))
        self.store: Store | None = None  # opened in `start`: connecting needs the event loop
        self.tasks: TaskRunner  # set by create_app (router/tasks.py builds on this module)
        self.draining = False
        self._in_flight: set[anyio.CancelScope] = set()

    @contextmanager
    def tracked(self, scope: anyio.CancelScope) -> Iterator[None]:
        """Keep a request's deadline where `drain` can shorten it."""
        self._in_flight.add(scope)
        try:
            yield
        finally:
            self._in_flight.discard(scope)

    async def drain(self) -> None:
        """SIGTERM: refuse new image requests; in-flight ones get until the grace period ends (less a
        second to answer), then fail with a clean 503 instead of a dropped connection."""
        self.draining = True
        cutoff = anyio.current_time() + max(0.0, self.cfg.server.shutdown_grace_s - 1)
        for scope in self._in_flight:
            scope.deadline = min(scope.deadline, cutoff)
        log.warning("draining: %d requests in flight, %.0f s grace", len(self._in_flight),
                    self.cfg.server.shutdown_grace_s)

    async def start(self) -> None:
        # Always opened, auth on or off: a bad `state.url` should stop the start, not the first request.
        self.store = await open_store(self.cfg.state.url)
        # Holds a crash left behind: only those older than any request can be, since other replicas
        # may share the store. Tasks' holds follow their leases instead (router/tasks.py).
        released = await self.store.release_stale_holds(self.cfg.server.request_timeout_s + STALE_HOLD_GRACE_S)
        if released:
            log.warning("released %d credit holds left by an earlier run", released)
        for name, reason in self.disabled.items():
            log.warning("provider %r disabled: %s; its routes are skipped", name, reason)
        for name, provider in list(self.providers.items()):
            try:
                await provider.start()
            except Exception as exc:  # one broken provider must not take the gateway down
                log.error("provider %r failed to start (%s); its routes are skipped", name, type(exc).__name__)
                self.disabled[name] = f"failed to start: {type(exc).__name__}"
                del self.providers[name]
        self.router = Router(self.cfg, self.providers, self.metrics)
        self.artifacts.sweep()

    async def stop(self) -> None:
        for provider in self.providers.values():
            await provider.aclose()
        if self.store is not None:
            await self.store.close()

    def secrets(self) -> list[str]:
        return [s for p in self.all_providers.values() for s in p.secrets() if s]

    def base_url(self, request: Request) -> str:
        return (self.cfg.server.public_url or f"{request.url.scheme}://{request.url.netloc}").rstrip("/")

    def count_delivery(self, model_id: str, price: Price, images: int) -> None:
        self.metrics.images.labels(model_id).inc(images)
        self.metrics.megapixels.labels(model_id).inc(float(price.megapixels))
        self.metrics.cost.labels(model_id).inc(float(price.cost))

    def pick_auto(self, body: GenerationBody, operation: str, inputs: Inputs,
                  allowed: Callable[[str], bool] = lambda model_id: True) -> Prepared:
        """`model: "auto"`: the candidates that can serve this very request now, ordered by policy.
        `allowed`: the caller's key may use this model (a key never gets a model outside its list)."""
        fits: list[tuple[Prepared, Route]] = []
        permitted = [m for m in map(self.router.resolve, self.cfg.auto.candidates) if allowed(m)]
        if self.cfg.auto.candidates and not permitted:
            raise ApiError(403, "this API key may use none of the models that 'auto' picks from",
                           param="model", code="model_not_allowed")
        for model_id in permitted:
            model = self.router.model(model_id)
            try:
                prepared = prepare(body, model_id, model, operation, inputs, check_extra_fields(body, model))
                self.router.check_capable(model_id, prepared.needs)
            except ApiError:
                continue
            routes = self.router.available(model_id, prepared.request, prepared.needs)
            if routes:
                fits.append((prepared, routes[0]))
        if not fits:
            raise ApiError(400, "no model in auto.candidates can serve this request now", param="model",
                           code="no_candidate_model")
        # Stable sorts: ties keep the candidates' configured order.
        policy = self.cfg.auto.policy
        if policy == "cheapest":
            fits.sort(key=lambda f: Price.of(f[0].request.width, f[0].request.height, f[0].request.n,
                                             self.router.model(f[0].model_id).price_per_mp).cost_micros)
        elif policy == "fastest":
            # A route never measured sorts first, so every candidate gets measured.
            fits.sort(key=lambda f: f[1].latency.mean or 0.0)
        elif policy == "least_busy":
            fits.sort(key=lambda f: self.router.health[f[1].provider.name].limiter.load)
        return fits[0][0]
