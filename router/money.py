"""Money as integer micro-dollars: parsed from decimal text, never through a float."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

MICROS_PER_USD = 1_000_000


def usd_to_micros(value: str | int | float | Decimal, *, allow_zero: bool = True) -> int:
    """'12.50' → 12_500_000. A float is read through its shortest repr (JSON numbers arrive as floats),
    so 0.1 stays 0.1. Sub-micro amounts are refused rather than rounded: money must not drift."""
    if isinstance(value, bool):
        raise ValueError("an amount in USD must be a number, not a boolean")
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"{value!r} is not an amount in USD") from None
    if not amount.is_finite():
        raise ValueError(f"{value!r} is not an amount in USD")
    micros = amount * MICROS_PER_USD
    if micros != micros.to_integral_value():
        raise ValueError(f"{value!r} has more precision than a micro-dollar (6 decimals)")
    if micros < 0 or (micros == 0 and not allow_zero):
        raise ValueError(f"{value!r} must be {'zero or more' if allow_zero else 'more than zero'}")
    return int(micros)


def format_usd(micros: int | None) -> str:
    """12_500_000 → '12.50'; None (no balance kept: unlimited) → 'unlimited'."""
    if micros is None:
        return "unlimited"
    text = f"{Decimal(micros) / MICROS_PER_USD:f}"
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.rstrip('0').ljust(2, '0')}"
