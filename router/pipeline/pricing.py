"""What a request costs: exact, from the model's price per megapixel, before anything runs."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

MICRO = Decimal(1_000_000)


@dataclass(frozen=True, slots=True)
class Price:
    megapixels: Decimal
    price_per_mp: Decimal
    cost_micros: int

    @classmethod
    def of(cls, width: int, height: int, n: int, price_per_mp: Decimal) -> Price:
        """Exact: megapixels = W×H×n / 10^6; cost rounded half-up to the micro-dollar."""
        mp = Decimal(width * height * n) / MICRO
        return cls(mp, price_per_mp, int((mp * price_per_mp * MICRO).quantize(Decimal(1), ROUND_HALF_UP)))

    @property
    def cost(self) -> Decimal:
        return Decimal(self.cost_micros) / MICRO

    def header(self) -> str:
        return f"{self.cost:.6f}"

    def body(self) -> dict[str, Any]:
        return {"megapixels": float(self.megapixels), "price_per_mp": float(self.price_per_mp),
                "cost": float(self.cost)}
