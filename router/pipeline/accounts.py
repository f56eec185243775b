"""API keys as the surfaces see them: the key behind a secret, a caller's usage, and the admin
operations (create, list, revoke, top up). The store's refusals become ApiErrors here."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

from ..errors import ApiError, invalid
from ..routing import ModelRouter
from ..state import KeyNotFound, KeyRecord, StateError, Store, format_usd
from .caller import Caller

USAGE_LIMIT = 100
PREFERENCES_FRESH_S = 1.0
# A key found by its secret is trusted this long without asking the store again: the request's
# admission is then its one round trip. A revoke through this replica ends it at once; one made
# elsewhere within this second (a metered key's hold refuses a revoked key at once anyway).
KEY_FRESH_S = 1.0
KEYS_KEPT = 10_000


class Accounts:
    def __init__(self, store: Store, router: ModelRouter) -> None:
        self.store, self.router = store, router
        self._recent: dict[str, tuple[dict[str, str], float]] = {}  # scope → (preferences, fresh until)
        self._keys: dict[bytes, tuple[KeyRecord, float]] = {}  # sha256 of a secret → (its key, fresh until)

    async def authenticate(self, secret: str) -> KeyRecord | None:
        """The live key whose secret this is; None for unknown, malformed and revoked alike. A key
        found in the last KEY_FRESH_S is not looked up again."""
        digest, now = hashlib.sha256(secret.encode()).digest(), time.monotonic()
        known = self._keys.get(digest)
        if known is not None and known[1] > now:
            return known[0]
        key = await self.store.authenticate(secret)
        if key is None:
            self._keys.pop(digest, None)
            return None
        if len(self._keys) >= KEYS_KEPT:
            self._keys.clear()
        self._keys[digest] = (key, now + KEY_FRESH_S)
        return key

    def _forget(self, key_id: str) -> None:
        self._keys = {digest: known for digest, known in self._keys.items() if known[0].id != key_id}

    async def usage(self, caller: Caller) -> dict[str, Any]:
        """The caller's balance and their latest ledger entries (most recent first). Needs a key:
        with auth off there is no caller to report on."""
        if caller.key is None:
            raise ApiError(404, "usage is kept per API key; this gateway runs with auth disabled",
                           code="usage_unavailable")
        key_id = caller.key.id
        record = await self.store.get_key(key_id)
        entries = await self.store.recent_ledger(key_id, USAGE_LIMIT)
        return {"object": "usage", "key_id": key_id, "balance_micros": record.balance_micros,
                "balance": format_usd(record.balance_micros), "ledger": [e.public() for e in entries]}

    async def preferences(self, caller: Caller) -> dict[str, str]:
        """What the caller chose to keep (its A1111 checkpoint, say), read from the store;
        gateway-wide with auth off."""
        scope = caller.owner or "-"
        found = await self.store.preferences(scope)
        self._recent[scope] = (found, time.monotonic() + PREFERENCES_FRESH_S)
        return found

    async def preference(self, caller: Caller, name: str) -> str | None:
        """One preference for a request on the hot path: a read of the last second is reused, so
        a client that generates without naming its model costs no store round trip per request.
        A change made on another replica is seen here within that second."""
        recent = self._recent.get(caller.owner or "-")
        found = recent[0] if recent is not None and recent[1] > time.monotonic() else await self.preferences(caller)
        return found.get(name)

    async def prefer(self, caller: Caller, name: str, value: str) -> None:
        scope = caller.owner or "-"
        await self.store.set_preference(scope, name, value)
        self._recent.pop(scope, None)

    def model_ids(self, names: Sequence[str]) -> list[str]:
        """Aliases are stored as the model ids they name: the check at request time sees resolved ids."""
        try:
            return [self.router.resolve(name) for name in names]
        except ApiError as exc:
            raise invalid(exc.message, "models", code="model_not_found") from None

    async def create_key(self, name: str, credits_micros: int | None, models: Sequence[str] | None,
                         rpm: int | None, concurrency: int | None) -> tuple[KeyRecord, str, str]:
        """A new key, its secret (shown this once: the store keeps its hash) and its webhook signing
        secret (shown this once too). `models`: ids, as `model_ids` resolves them."""
        try:
            key, secret = await self.store.create_key(name, credits_micros, models, rpm, concurrency)
        except StateError as exc:
            raise invalid(str(exc)) from None
        return key, secret, await self.store.rotate_webhook_secret(key.id)

    async def rotate_webhook_secret(self, key_id: str) -> str:
        try:
            return await self.store.rotate_webhook_secret(key_id)
        except KeyNotFound as exc:
            raise ApiError(404, str(exc), code="key_not_found") from None

    async def list_keys(self) -> list[KeyRecord]:
        return await self.store.list_keys()

    async def revoke(self, key_id: str) -> KeyRecord:
        self._forget(key_id)
        try:
            return await self.store.revoke(key_id)
        except KeyNotFound as exc:
            raise ApiError(404, str(exc), code="key_not_found") from None

    async def topup(self, key_id: str, micros: int, reference: str | None) -> KeyRecord:
        try:
            return await self.store.topup(key_id, micros, reference)
        except KeyNotFound as exc:
            raise ApiError(404, str(exc), code="key_not_found") from None
        except StateError as exc:
            raise invalid(str(exc), "credits", code="key_unlimited") from None
