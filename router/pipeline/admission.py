"""Whether a validated request may start, and what it holds while it runs: the key's rate limit
(requests per clock minute), its concurrency slot and its credit hold.

All of it lives in the state store, so the limits hold across gateway replicas. Unlimited keys
and auth-off requests hold no credit; settlement.py gives back what admission took.
"""

from __future__ import annotations

from ..errors import ApiError
from ..state import InsufficientCredit, Store, format_usd
from .caller import Caller
from .settlement import Admitted, Hold, settle
from .validation import Prepared

SLOT_GRACE_S = 60.0  # a slot outlives any request by this much; then a crashed replica's slot lapses


class Admission:
    def __init__(self, store: Store, longest_run_s: float) -> None:
        self.store = store
        self.slot_ttl_s = longest_run_s + SLOT_GRACE_S  # a task holds its slot as long as it may run

    async def check_rate(self, caller: Caller) -> None:
        """429 when the caller's key has used its requests for this clock minute."""
        key = caller.key
        if key is None or key.rpm is None:
            return
        wait_s = await self.store.count_request(key.id, key.rpm)
        if wait_s is not None:
            raise ApiError(429, f"this API key is limited to {key.rpm} requests per minute",
                           code="rate_limit_exceeded", retry_after=wait_s)

    async def admit(self, prepared: Prepared, caller: Caller) -> Admitted:
        """Rate limit, concurrency slot, then the credit hold; a refusal leaves nothing taken."""
        await self.check_rate(caller)
        key = caller.key
        slot = None
        if key is not None and key.concurrency is not None:
            slot = await self.store.acquire_slot(key.id, key.concurrency, self.slot_ttl_s)
            if slot is None:
                raise ApiError(429, f"this API key may run {key.concurrency} requests at once; wait for one "
                               "to finish", code="concurrency_limit_exceeded", retry_after=1)
        try:
            return Admitted(await self._hold(prepared, caller), slot)
        except BaseException:
            await settle(self.store, Admitted(slot=slot), 0)
            raise

    async def _hold(self, prepared: Prepared, caller: Caller) -> Hold | None:
        """Hold the request's price on the caller's key; None when nothing is metered."""
        key = caller.key
        if key is None or key.balance_micros is None:
            return None
        micros = prepared.price.cost_micros
        try:
            return Hold(await self.store.hold(key.id, micros, caller.request_id), micros)
        except InsufficientCredit:
            raise ApiError(402, f"this request costs {format_usd(micros)} USD, more than the API key's "
                           "remaining credit", code="insufficient_quota",
                           headers={"x-should-retry": "false"}) from None
