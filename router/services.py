"""The running gateway's services, opened once in the app's lifespan and never None afterwards:
providers, the model router, the state and artifact stores, and the pipeline (which owns the task
runner). Surfaces reach them through `router/http/context.py`."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagegate.providers import registry
from imagegate.providers.base import Provider

from .artifacts import ArtifactStore, load_or_create_secret, open_artifacts
from .config import Config, base_dir_of
from .metrics import Metrics
from .pipeline import Pipeline
from .pipeline.accounts import Accounts
from .pipeline.settlement import STALE_HOLD_GRACE_S
from .pipeline.task_runner import TaskRunner
from .routing import ModelRouter
from .state import Store, open_store

log = logging.getLogger("imagegate")


@dataclass(frozen=True)
class Services:
    cfg: Config
    metrics: Metrics
    all_providers: dict[str, Provider]  # every configured instance, enabled or not
    disabled: dict[str, str]  # name → why its routes are skipped
    router: ModelRouter
    store: Store
    artifacts: ArtifactStore
    pipeline: Pipeline

    @property
    def tasks(self) -> TaskRunner:
        return self.pipeline.tasks

    @property
    def accounts(self) -> Accounts:
        return self.pipeline.accounts

    async def readiness(self) -> dict[str, Any]:
        """Ready when the config is loaded, the state store answers, artifacts can be stored, some
        route's circuit is not open, and the gateway is not draining."""
        health = self.router.health
        usable = any(health[r.provider.name].breaker.available()
                     for m in self.cfg.models for r in self.router.routes[m])
        artifacts_problem = await self.artifacts.ping()
        checks = {"config": True, "state": await self.store.ping(), "artifacts": artifacts_problem is None,
                  "routes": usable, "accepting": not self.pipeline.drain.draining}
        problems = {"artifacts": artifacts_problem} if artifacts_problem else {}
        return {"status": "ready" if all(checks.values()) else "not_ready", "checks": checks, "problems": problems,
                "disabled_providers": self.disabled,
                "circuits": {name: h.breaker.state.name.lower() for name, h in health.items()}}

    def observe_upstreams(self) -> None:
        for name, provider in self.all_providers.items():
            self.metrics.observe_upstream(name, provider.report())

    def provider_report(self) -> dict[str, Any]:
        """Every provider instance with its circuit, load and observed latency (the admin view)."""
        out = {}
        for name, provider in self.all_providers.items():
            item: dict[str, Any] = {"type": provider.kind, "enabled": name in self.router.providers,
                                **provider.report()}
            if name in self.disabled:
                item["disabled_reason"] = self.disabled[name]
            if (h := self.router.health.get(name)) is not None:
                item.update({
                    "circuit": h.breaker.state.name.lower(), "consecutive_failures": h.breaker.consecutive,
                    "retry_after_s": h.breaker.retry_after() if h.breaker.state.name == "OPEN" else 0,
                    "in_flight": h.limiter.in_flight, "queued": h.limiter.waiting,
                    "max_concurrency": h.limiter.concurrency, "max_queue": h.limiter.max_queue,
                    "latency_s": h.latency.mean, "last_error": h.last_error, "last_error_at": h.last_error_at})
            out[name] = item
        return out


async def _signing_secret(cfg: Config, store: Store) -> bytes:
    """The secret of the gateway's signed URLs: configured, else made once — beside a local
    directory, or, with a bucket, in the state store that all replicas share."""
    if cfg.auth.signing_secret:
        return cfg.auth.signing_secret.encode()
    if cfg.artifacts.bucket is None:
        return load_or_create_secret("", Path(cfg.artifacts.dir))
    return (await store.shared_secret("artifact_signing_secret", secrets.token_hex(32))).encode()


def _disabled_reason(name: str, provider: Provider, cfg: Config) -> str | None:
    if not provider.options.enabled:
        return "enabled: false"
    unset = sorted({env for path, env in cfg.unset_env if path.startswith(f"providers.{name}.")})
    if unset:
        return f"{', '.join(unset)} not set"
    missing = provider.missing_settings()
    return f"missing {', '.join(missing)}" if missing else None


async def _start_providers(cfg: Config, metrics: Metrics) -> tuple[dict[str, Provider], dict[str, str]]:
    """Every configured instance, and why each one that will not serve is disabled."""
    base_dir = base_dir_of(cfg.source)
    every = {name: registry.create(name, raw, base_dir) for name, raw in cfg.providers.items()}
    disabled = {name: reason for name, p in every.items() if (reason := _disabled_reason(name, p, cfg))}
    for name, reason in disabled.items():
        log.warning("provider %r disabled: %s; its routes are skipped", name, reason)
    for name, provider in every.items():
        provider.bind_metrics(metrics.registry)
        if name in disabled:
            continue
        try:
            await provider.start()
        except Exception as exc:  # one broken provider must not take the gateway down
            log.error("provider %r failed to start (%s); its routes are skipped", name, type(exc).__name__)
            disabled[name] = f"failed to start: {type(exc).__name__}"
    return every, disabled


@asynccontextmanager
async def open_services(cfg: Config, metrics: Metrics) -> AsyncIterator[Services]:
    """Open every service in order, and close them in reverse however the gateway stops."""
    # Always opened, auth on or off: a bad `state.url` should stop the start, not the first request.
    store = await open_store(cfg.state.url)
    every: dict[str, Provider] = {}
    disabled: dict[str, str] = {}
    try:
        # Holds a crash left behind: only those older than any request can be, since other replicas
        # may share the store. Tasks' holds follow their leases instead (task_runner.py).
        released = await store.release_stale_holds(cfg.longest_run_s + STALE_HOLD_GRACE_S)
        if released:
            log.warning("released %d credit holds left by an earlier run", released)
        for model_id in (m for m, model in cfg.models.items() if not model.priced):
            log.warning("model %r has no price (price_per_mp or price_per_image): it is served free", model_id)
        every, disabled = await _start_providers(cfg, metrics)
        router = ModelRouter(cfg, {n: p for n, p in every.items() if n not in disabled}, metrics)
        artifacts = open_artifacts(cfg.artifacts, await _signing_secret(cfg, store))
        await artifacts.sweep()
        pipeline = Pipeline(cfg, metrics, router, store, artifacts)
        services = Services(cfg, metrics, every, disabled, router, store, artifacts, pipeline)
        await pipeline.tasks.start()
        await pipeline.webhooks.start()
        try:
            yield services
        finally:
            await pipeline.webhooks.stop()
            await pipeline.tasks.stop()  # tasks still running fail and refund, before the store closes
    finally:
        for name, provider in every.items():
            if name not in disabled:  # only the started ones hold clients and pools
                await provider.aclose()
        await store.close()
