"""Idempotency-Key replays: a repeat of a request with the same key and the same content gets the
first answer again, and is charged once. The records live in the state store, so a retry that
reaches another replica is recognised too."""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson

from ..errors import ApiError
from ..state import Claim, Replay, Store
from .admission import SLOT_GRACE_S
from .caller import Caller
from .json_parts import Piece, json_parts
from .settlement import SETTLE_TIMEOUT_S

log = logging.getLogger("imagegate.admission")
WAIT_POLL_S = 0.1
# Replayed as they were; hop-by-hop and per-response headers (request id, length) are made anew.
_KEPT_HEADERS = ("content-type", "location", "x-imagegate-model", "x-imagegate-provider", "x-imagegate-cost",
                 "x-imagegate-fallback", "x-imagegate-task")


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole answer as a surface rendered it: what an Idempotency-Key replays."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    media_type: str = "application/json"
    # A JSON answer with images: its body in pieces (the images' base64 as it arrived), written one
    # after the other; `body` is then empty.
    parts: tuple[Piece, ...] = ()

    @classmethod
    def json(cls, content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
        parts = json_parts(content)
        if len(parts) == 1:
            return cls(status, bytes(parts[0]), dict(headers or {}))
        return cls(status, b"", dict(headers or {}), parts=tuple(parts))

    def whole(self) -> bytes:
        """The body as one bytes object (a copy when in pieces): what a replay stores."""
        return b"".join(self.parts) if self.parts else self.body


def fingerprint(endpoint: str, fields: Any, blobs: Iterable[bytes] = ()) -> str:
    """What makes two requests "the same": the endpoint, the fields in canonical JSON, and the
    bytes of any files (hashed one by one: multipart boundaries differ on every retry)."""
    digest = hashlib.sha256(endpoint.encode() + b"\0")
    digest.update(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS, default=str))
    for blob in blobs:
        digest.update(hashlib.sha256(blob).digest())
    return digest.hexdigest()


class Idempotency:
    def __init__(self, store: Store, request_timeout_s: float, ttl_hours: float) -> None:
        self.store = store
        self.wait_s = request_timeout_s
        self.lease_s = request_timeout_s + SLOT_GRACE_S  # the first runner's claim outlives any request
        self.ttl_s = ttl_hours * 3600

    async def once(self, caller: Caller, key: str | None, print_: Callable[[], str],
                   handle: Callable[[], Awaitable[Reply]]) -> Reply:
        """Run `handle` once per (caller, Idempotency-Key): a repeat with the same request replays the
        first success; with another request it is a 409. Failures are not kept, so a retry runs again."""
        if key is None:
            return await handle()
        scope, owner, mark = caller.owner or "-", "req_" + secrets.token_hex(8), print_()
        claim = Claim("wait")
        with anyio.move_on_after(self.wait_s):
            while True:
                claim = await self.store.claim_idempotency(scope, key, mark, owner, self.lease_s, self.ttl_s)
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
        return await self._run_once(scope, key, owner, handle)

    async def _run_once(self, scope: str, key: str, owner: str, handle: Callable[[], Awaitable[Reply]]) -> Reply:
        reply: Reply | None = None
        try:
            reply = await handle()
        finally:
            # Shielded and bounded; a store error here must not replace the answer (the work is done and
            # paid for): the record then stays pending until its lease lapses.
            with anyio.CancelScope(shield=True), anyio.move_on_after(SETTLE_TIMEOUT_S):
                try:
                    if reply is not None and 200 <= reply.status < 300:
                        headers = {k: v for k, v in reply.headers.items() if k in _KEPT_HEADERS}
                        headers["content-type"] = reply.media_type
                        await self.store.complete_idempotency(scope, key, owner,
                                                              Replay(reply.status, headers, reply.whole()))
                    else:
                        await self.store.abandon_idempotency(scope, key, owner)
                except Exception:
                    log.exception("could not record the outcome of Idempotency-Key request %s", owner)
        return reply


def _replayed(replay: Replay) -> Reply:
    headers = {**replay.headers, "idempotency-replayed": "true"}
    media_type = headers.pop("content-type", "application/json")
    return Reply(replay.status_code, replay.body, headers, media_type)
