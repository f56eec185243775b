"""Whether a validated request may start, and what it holds while it runs: the key's rate limit
(requests per clock minute), its concurrency slot and its credit hold, taken in one transaction
(one round trip to the store per request).

All of it lives in the state store, so the limits hold across gateway replicas. Unlimited keys
and auth-off requests hold no credit; settlement.py gives back what admission took.
"""

from __future__ import annotations

from ..errors import ApiError
from ..state import Store, format_usd
from .caller import Caller
from .settlement import Admitted, Hold
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
            raise _rate_limited(key.rpm, wait_s)

    async def admit(self, prepared: Prepared, caller: Caller) -> Admitted:
        """Rate limit, concurrency slot, then the credit hold, in one store transaction; a refusal
        leaves nothing taken."""
        key = caller.key
        metered = key is not None and key.balance_micros is not None
        if key is None or (key.rpm is None and key.concurrency is None and not metered):
            return Admitted()
        micros = prepared.price.cost_micros
        got = await self.store.admit(key.id, rpm=key.rpm, concurrency=key.concurrency, slot_ttl_s=self.slot_ttl_s,
                                     hold_micros=micros if metered else None, reference=caller.request_id)
        if got.refused == "rate":
            raise _rate_limited(key.rpm, got.wait_s)
        if got.refused == "concurrency":
            raise ApiError(429, f"this API key may run {key.concurrency} requests at once; wait for one "
                           "to finish", code="concurrency_limit_exceeded", retry_after=1)
        if got.refused == "revoked":
            raise ApiError(401, "this API key has been revoked", code="invalid_api_key",
                           headers={"www-authenticate": "Bearer"})
        if got.refused == "credit":
            raise ApiError(402, f"this request costs {format_usd(micros)} USD, more than the API key's "
                           "remaining credit", code="insufficient_quota", headers={"x-should-retry": "false"})
        return Admitted(None if got.hold_id is None else Hold(got.hold_id, micros), got.slot_id)


def _rate_limited(rpm: int | None, wait_s: int | None) -> ApiError:
    return ApiError(429, f"this API key is limited to {rpm} requests per minute", code="rate_limit_exceeded",
                    retry_after=wait_s)
