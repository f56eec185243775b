"""The running gateway: configuration, providers, router, artifact store and metrics in one place."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from providers import registry
from providers.base import Provider

from .artifacts import ArtifactStore, load_or_create_secret
from .config import Config
from .errors import ApiError
from .metrics import Metrics
from .output import Price
from .routing import Router
from .schemas import GenerationBody
from .validation import Inputs, Prepared, check_extra_fields, prepare

log = logging.getLogger("imagegate")


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
        self.disabled: dict[str, str] = {}
        for name, provider in self.all_providers.items():
            reason = _disabled_reason(name, provider, cfg)
            if reason:
                self.disabled[name] = reason
        self.providers = {n: p for n, p in self.all_providers.items() if n not in self.disabled}
        self.router = Router(cfg, self.providers)
        art_dir = Path(cfg.artifacts.dir)
        self.artifacts = ArtifactStore(art_dir, cfg.artifacts.ttl_hours,
                                       load_or_create_secret(cfg.auth.signing_secret, art_dir))

    async def start(self) -> None:
        for name, reason in self.disabled.items():
            log.warning("provider %r disabled: %s; its routes are skipped", name, reason)
        for name, provider in list(self.providers.items()):
            try:
                await provider.start()
            except Exception as exc:  # one broken provider must not take the gateway down
                log.error("provider %r failed to start (%s); its routes are skipped", name, type(exc).__name__)
                self.disabled[name] = f"failed to start: {type(exc).__name__}"
                del self.providers[name]
        self.router = Router(self.cfg, self.providers)
        if self.cfg.auto.policy in ("fastest", "least_busy"):
            log.warning("auto.policy %r needs latency/load tracking, which this build lacks: "
                        "candidates are taken in priority order", self.cfg.auto.policy)
        self.artifacts.sweep()

    async def stop(self) -> None:
        for provider in self.providers.values():
            await provider.aclose()

    def secrets(self) -> list[str]:
        return [s for p in self.all_providers.values() for s in p.secrets() if s]

    def base_url(self, request: Request) -> str:
        return (self.cfg.server.public_url or f"{request.url.scheme}://{request.url.netloc}").rstrip("/")

    def count_delivery(self, model_id: str, price: Price, images: int) -> None:
        self.metrics.images.labels(model_id).inc(images)
        self.metrics.megapixels.labels(model_id).inc(float(price.megapixels))
        self.metrics.cost.labels(model_id).inc(float(price.cost))

    def pick_auto(self, body: GenerationBody, operation: str, inputs: Inputs) -> Prepared:
        """`model: "auto"`: the candidates that can serve this very request, ordered by policy."""
        fits: list[Prepared] = []
        for name in self.cfg.auto.candidates:
            model_id = self.router.resolve(name)
            model = self.router.model(model_id)
            try:
                prepared = prepare(body, model_id, model, operation, inputs, check_extra_fields(body, model))
                self.router.check_capable(model_id, prepared.needs)
            except ApiError:
                continue
            if self.router.eligible(model_id, prepared.needs):
                fits.append(prepared)
        if not fits:
            raise ApiError(400, "no model in auto.candidates can serve this request", param="model",
                           code="no_candidate_model")
        if self.cfg.auto.policy == "cheapest":
            fits.sort(key=lambda p: Price.of(p.request.width, p.request.height, p.request.n,
                                             self.router.model(p.model_id).price_per_mp).cost_micros)
        return fits[0]
