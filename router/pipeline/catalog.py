"""The configured models as clients see them: what each can do, its limits, price and routes."""

from __future__ import annotations

import time
from typing import Any

from ..config import ModelConfig
from ..routing import ModelRouter
from .validation import nearest_size

_STARTED = int(time.time())


class Catalog:
    def __init__(self, router: ModelRouter) -> None:
        self.router = router

    def ids(self) -> list[str]:
        return list(self.router.routes)

    def generating(self) -> list[str]:
        """The models that can make images from a prompt (the others only edit)."""
        return [m for m in self.ids() if "generate" in self.router.capabilities(m)]

    def resolve(self, name: str) -> str:
        """The model id a name or alias stands for; 404 for an unknown one."""
        return self.router.resolve(name)

    def nearest_size(self, model_id: str, ratio: float, pixels: int) -> str:
        """The model's legal size with this aspect ratio nearest to `pixels` in area, as WxH."""
        width, height = nearest_size(ratio, pixels, self.router.model(model_id))
        return f"{width}x{height}"

    def knows(self, name: str) -> bool:
        return name in self.router.names

    def card(self, name: str) -> dict[str, Any]:
        """The model a name or alias resolves to (404 for an unknown one), in OpenAI's model shape
        plus capabilities, limits, sizes, price and its routes' providers (never their secrets)."""
        router = self.router
        model_id = router.resolve(name)
        model = router.model(model_id)
        return {
            "id": model_id, "object": "model", "created": _STARTED, "owned_by": "imagegate",
            "aliases": model.aliases, "description": model.description,
            "capabilities": sorted(router.capabilities(model_id)),
            "limits": model.limits.model_dump(), "sizes": model.sizes, "default_size": model.default_size,
            **_prices(model),
            "routes": [{"provider": r.provider, "enabled": r.provider in router.providers} for r in model.routes],
            # The tuning fields some route of the model can express (others are ignored, not refused).
            "honours": sorted(set().union(*(r.provider.honours for r in router.routes[model_id]))
                              | ({"quality"} if model.quality else set())),
            # Whether a request could be routed now: some route enabled and its circuit not open.
            "available": any(router.health[r.provider.name].breaker.available() for r in router.routes[model_id]),
        }


def _prices(model: ModelConfig) -> dict[str, Any]:
    if model.price_per_image is not None:
        return {"price_per_image": {capability: {tier: float(usd) for tier, usd in tiers.items()}
                                    for capability, tiers in model.price_per_image.items()}}
    return {"price_per_mp": float(model.price_per_mp or 0)}
