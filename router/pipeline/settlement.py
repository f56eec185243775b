"""Giving back what admission took: the hold settled for what was delivered (captured) and the
rest released, then the concurrency slot freed. Any failure, timeout or cancel delivers nothing,
so the hold is released in full."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anyio

from ..state import Store
from .pricing import MICRO

log = logging.getLogger("imagegate.billing")
SETTLE_TIMEOUT_S = 15  # a settle that cannot reach the store is left to the stale-hold sweep
STALE_HOLD_GRACE_S = 60.0  # added to Config.longest_run_s before a hold counts as abandoned


@dataclass(frozen=True, slots=True)
class Hold:
    id: str
    micros: int

    def body(self, charged: int) -> dict[str, float]:
        """Display amounts for the response's `billing` (USD floats made from exact micros)."""
        return {"held": float(self.micros / MICRO), "charged": float(charged / MICRO),
                "refunded": float((self.micros - charged) / MICRO)}


@dataclass(slots=True)
class Admitted:
    """What a running request holds (admission.py takes it), until `settle` gives it back."""

    hold: Hold | None = None
    slot: str | None = None
    settled: bool = False


async def settle(store: Store, admitted: Admitted, delivered_micros: int) -> None:
    """Capture `delivered_micros` of the hold, release the rest, free the slot; once per request.

    Shielded and bounded, so a cancelled request (client gone, deadline, shutdown) still gives its
    hold back; a store that cannot be reached leaves the hold to the stale-hold sweep and the slot
    to lapse after the request deadline."""
    if admitted.settled:
        return
    admitted.settled = True
    if admitted.hold is None and admitted.slot is None:
        return
    with anyio.CancelScope(shield=True):
        try:
            with anyio.fail_after(SETTLE_TIMEOUT_S):  # one transaction: the hold settled, the slot freed
                await store.settle_request(None if admitted.hold is None else admitted.hold.id, delivered_micros,
                                           admitted.slot)
        except Exception:  # the answer stands; a sweep releases the hold, the slot lapses by itself
            log.exception("could not settle request (hold %s, slot %s)",
                          None if admitted.hold is None else admitted.hold.id, admitted.slot)
