"""What a request costs, exact and known before anything runs: per megapixel
(`megapixels = W × H × n ÷ 10⁶`, cost rounded half-up to the micro-dollar) or per image by
capability and quality (`n × price`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from ..config import ModelConfig
from ..errors import invalid

MICRO = Decimal(1_000_000)
# The quality a per-image price is looked up by: OpenAI's names mapped onto standard and hd.
TIERS = {"hd": "hd", "high": "hd"}
CAPABILITIES = {"generate": "text_to_image", "edit": "image_to_image"}


def _micros(usd: Decimal) -> int:
    return int((usd * MICRO).quantize(Decimal(1), ROUND_HALF_UP))


@dataclass(frozen=True, slots=True)
class Price:
    width: int
    height: int
    n: int
    price_per_mp: Decimal | None = None  # one of the two rates is set
    price_per_image: Decimal | None = None
    tier: str | None = None  # "standard" | "hd", for per-image prices

    @classmethod
    def of(cls, width: int, height: int, n: int, price_per_mp: Decimal) -> Price:
        return cls(width, height, n, price_per_mp=price_per_mp)

    @classmethod
    def for_request(cls, model: ModelConfig, model_id: str, operation: str, quality: str | None,
                    width: int, height: int, n: int) -> Price:
        """The model's price for this request; a 400 when its per-image table has no entry for it."""
        table = model.price_per_image
        if table is None:
            return cls.of(width, height, n, model.price_per_mp or Decimal(0))
        capability, tier = CAPABILITIES[operation], TIERS.get(quality or "", "standard")
        prices = table.get(capability)  # type: ignore[call-overload]
        if not prices:
            raise invalid(f"model '{model_id}' is not priced for {capability}", "model", code="unsupported_capability")
        return cls(width, height, n, price_per_image=prices.get(tier, prices["standard"]), tier=tier)

    def for_images(self, n: int) -> Price:
        """The same rate for another number of images (what was delivered)."""
        return self if n == self.n else replace(self, n=n)

    @property
    def megapixels(self) -> Decimal:
        return Decimal(self.width * self.height * self.n) / MICRO

    @property
    def cost_micros(self) -> int:
        if self.price_per_image is not None:
            return self.n * _micros(self.price_per_image)
        return _micros(self.megapixels * (self.price_per_mp or Decimal(0)))

    @property
    def cost(self) -> Decimal:
        return Decimal(self.cost_micros) / MICRO

    def header(self) -> str:
        return f"{self.cost:.6f}"

    def body(self) -> dict[str, Any]:
        if self.price_per_image is not None:
            return {"megapixels": float(self.megapixels), "images": self.n,
                    "price_per_image": float(self.price_per_image), "quality": self.tier, "cost": float(self.cost)}
        return {"megapixels": float(self.megapixels), "price_per_mp": float(self.price_per_mp or 0),
                "cost": float(self.cost)}
