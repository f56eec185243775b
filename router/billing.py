"""Per-request credit holds for keyed callers (auth on, a key with a balance), and GET /v1/usage.

The flow: hold the request's price before routing (402 when the balance cannot cover it) →
capture the price of the images delivered → release the rest. Any failure, timeout or cancel
releases the hold in full. Unlimited keys and auth-off requests hold nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response

from .auth import api_key
from .errors import ApiError
from .gateway import Gateway, JSONResponse
from .output import MICRO, Price
from .state import InsufficientCredit, format_usd
from .validation import Prepared

log = logging.getLogger("imagegate.billing")
SETTLE_TIMEOUT_S = 15  # a settle that cannot reach the store is left to the stale-hold sweep
USAGE_LIMIT = 100


@dataclass
class Hold:
    id: str
    micros: int
    captured: int = 0  # set once the images are delivered; 0 (a full release) until then

    def body(self, charged: int) -> dict[str, float]:
        """Display amounts for the response's `billing` (USD floats made from exact micros)."""
        return {"held": float(self.micros / MICRO), "charged": float(charged / MICRO),
                "refunded": float((self.micros - charged) / MICRO)}


async def place(request: Request, gw: Gateway, prepared: Prepared) -> Hold | None:
    """Hold the request's price on the caller's key; None when nothing is metered."""
    key = api_key(request)
    if key is None or key.balance_micros is None or gw.store is None:
        return None
    req = prepared.request
    price = Price.of(req.width, req.height, req.n, gw.router.model(prepared.model_id).price_per_mp)
    try:
        hold_id = await gw.store.hold(key.id, price.cost_micros, getattr(request.state, "request_id", None))
    except InsufficientCredit:
        raise ApiError(402, f"this request costs {format_usd(price.cost_micros)} USD, more than the API "
                       "key's remaining credit", code="insufficient_quota",
                       headers={"x-should-retry": "false"}) from None
    return Hold(hold_id, price.cost_micros)


async def settle(gw: Gateway, hold: Hold | None) -> None:
    """Capture what was delivered and release the rest; shielded, so a cancelled request (client
    gone, deadline, shutdown) still gives its hold back."""
    if hold is None or gw.store is None:
        return
    with anyio.CancelScope(shield=True):
        try:
            with anyio.fail_after(SETTLE_TIMEOUT_S):
                await gw.store.settle(hold.id, hold.captured)
        except Exception:  # the answer stands; the sweep at the next start releases what is left
            log.exception("could not settle hold %s", hold.id)


async def usage(request: Request) -> Response:
    """GET /v1/usage: the caller's balance and their latest ledger entries (most recent first).

    Needs a key: with auth off there is no caller to report on, so the answer is 404."""
    request.state.endpoint = "/v1/usage"
    gw: Gateway = request.app.state.gateway
    key = api_key(request)
    if key is None or gw.store is None:
        raise ApiError(404, "usage is kept per API key; this gateway runs with auth disabled",
                       code="usage_unavailable")
    record = await gw.store.get_key(key.id)
    entries = await gw.store.recent_ledger(key.id, USAGE_LIMIT)
    body: dict[str, Any] = {"object": "usage", "key_id": key.id, "balance_micros": record.balance_micros,
                            "balance": format_usd(record.balance_micros),
                            "ledger": [e.public() for e in entries]}
    return JSONResponse(body)
