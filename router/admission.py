"""Whether a validated request may start, and what it holds while it runs: the key's rate limit
(requests per clock minute), its concurrency slot, its credit hold; and Idempotency-Key replays.

All of it lives in the state store, so the limits and replays hold across gateway replicas.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import Response

from . import billing
from .auth import api_key
from .errors import ApiError, invalid
from .gateway import Gateway
from .state import Claim, Replay
from .validation import Prepared

log = logging.getLogger("imagegate.admission")
SLOT_GRACE_S = 60.0  # a slot outlives any request by this much; then a crashed replica's slot lapses
WAIT_POLL_S = 0.1
# Replayed as they were; hop-by-hop and per-response headers (request id, length) are made anew.
_KEPT_HEADERS = ("content-type", "location", "x-imagegate-model", "x-imagegate-provider", "x-imagegate-cost",
                 "x-imagegate-task")


@dataclass
class Admitted:
    """What a running request holds; `close` gives it all back (the hold settled as delivered)."""
    hold: billing.Hold | None = None
    slot: str | None = None

    async def close(self, gw: Gateway) -> None:
        await billing.settle(gw, self.hold)
        if self.slot is not None and gw.store is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(billing.SETTLE_TIMEOUT_S):
                try:
                    await gw.store.release_slot(self.slot)
                except Exception:  # it lapses by itself after the request deadline
                    log.exception("could not free concurrency slot %s", self.slot)


async def check_rate(request: Request, gw: Gateway) -> None:
    """429 when the caller's key has used its requests for this clock minute."""
    key = api_key(request)
    if key is None or key.rpm is None or gw.store is None:
        return
    wait_s = await gw.store.count_request(key.id, key.rpm)
    if wait_s is not None:
        raise ApiError(429, f"this API key is limited to {key.rpm} requests per minute",
                       code="rate_limit_exceeded", retry_after=wait_s)


async def admit(request: Request, gw: Gateway, prepared: Prepared) -> Admitted:
    """Rate limit, concurrency slot, then the credit hold; a refusal leaves nothing taken."""
    await check_rate(request, gw)
    admitted = Admitted()
    key = api_key(request)
    if key is not None and key.concurrency is not None and gw.store is not None:
        ttl = gw.cfg.server.request_timeout_s + SLOT_GRACE_S
        admitted.slot = await gw.store.acquire_slot(key.id, key.concurrency, ttl)
        if admitted.slot is None:
            raise ApiError(429, f"this API key may run {key.concurrency} requests at once; wait for one "
                           "to finish", code="concurrency_limit_exceeded", retry_after=1)
    try:
        admitted.hold = await billing.place(request, gw, prepared)
    except BaseException:
        await admitted.close(gw)
        raise
    return admitted


# -- Idempotency-Key ----------------------------------------------------------------------------

def idempotency_key(request: Request) -> str | None:
    value = request.headers.get("idempotency-key")
    if value is None:
        return None
    if not 1 <= len(value) <= 255 or not all(" " <= ch <= "~" for ch in value):
        raise invalid("Idempotency-Key must be 1 to 255 printable ASCII characters", "Idempotency-Key")
    return value


def fingerprint(endpoint: str, fields: Any, blobs: Iterable[bytes] = ()) -> str:
    """What makes two requests "the same": the endpoint, the fields in canonical JSON, and the
    bytes of any files (hashed one by one: multipart boundaries differ on every retry)."""
    digest = hashlib.sha256(endpoint.encode() + b"\0")
    digest.update(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS, default=str))
    for blob in blobs:
        digest.update(hashlib.sha256(blob).digest())
    return digest.hexdigest()


async def idempotent(request: Request, gw: Gateway, key: str | None, print_: Callable[[], str],
                     handle: Callable[[], Awaitable[Response]]) -> Response:
    """Run `handle` once per (caller, Idempotency-Key): a repeat with the same request replays the
    first success; with another request it is a 409. Failures are not kept, so a retry runs again."""
    if key is None or gw.store is None:
        return await handle()
    caller = api_key(request)
    scope, owner, mark = (caller.id if caller else "-"), "req_" + secrets.token_hex(8), print_()
    lease_s = gw.cfg.server.request_timeout_s + SLOT_GRACE_S
    ttl_s = gw.cfg.state.idempotency_hours * 3600
    claim = Claim("wait")
    with anyio.move_on_after(gw.cfg.server.request_timeout_s):
        while True:
            claim = await gw.store.claim_idempotency(scope, key, mark, owner, lease_s, ttl_s)
            if claim.action == "conflict":
                raise ApiError(409, "this Idempotency-Key was already used with a different request",
                               param="Idempotency-Key", code="idempotency_key_reused")
            if claim.action == "replay" and claim.replay is not None:
                return _replayed(claim.replay)
            if claim.action == "run":
                break
            await anyio.sleep(WAIT_POLL_S)  # the first request with this key is still running
    if claim.action != "run":
        raise ApiError(409, "a request with this Idempotency-Key is still in progress; retry later",
                       param="Idempotency-Key", code="idempotency_key_in_use", retry_after=1)
    return await _run_once(gw, scope, key, owner, handle)


async def _run_once(gw: Gateway, scope: str, key: str, owner: str,
                    handle: Callable[[], Awaitable[Response]]) -> Response:
    assert gw.store is not None
    response: Response | None = None
    try:
        response = await handle()
    finally:
        # Shielded and bounded; a store error here must not replace the answer (the work is done and
        # paid for): the record then stays pending until its lease lapses.
        with anyio.CancelScope(shield=True), anyio.move_on_after(billing.SETTLE_TIMEOUT_S):
            try:
                if response is not None and 200 <= response.status_code < 300:
                    headers = {k: v for k, v in response.headers.items() if k in _KEPT_HEADERS}
                    await gw.store.complete_idempotency(
                        scope, key, owner, Replay(response.status_code, headers, bytes(response.body)))
                else:
                    await gw.store.abandon_idempotency(scope, key, owner)
            except Exception:
                log.exception("could not record the outcome of Idempotency-Key request %s", owner)
    return response


def _replayed(replay: Replay) -> Response:
    headers = {**replay.headers, "idempotency-replayed": "true"}
    media_type = headers.pop("content-type", "application/json")
    return Response(replay.body, status_code=replay.status_code, headers=headers, media_type=media_type)
