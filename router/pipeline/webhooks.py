"""Webhooks: a task's end announced to the URL its request gave, signed per Standard Webhooks v1
(docs/providers.md §10) with the key's secret.

At submission the URL is checked as an input URL is (router/fetch.py: https, every address public,
no credentials in it); a refused one is a 400 and no task. The task's end writes an outbox row in
the same transaction (router/state/webhooks.py). Every replica's sender polls the outbox, claims
due rows through a lease (so one replica sends each attempt) and POSTs the event: a thin body, the
task object with links, never bytes. Each attempt resolves and checks the host again and connects
to the address it checked; redirects are not followed. 2xx: delivered. 410: that URL is disabled
for the key. 429/503 with Retry-After: retried then. Anything else: retried on `webhooks.backoff_s`
until `max_attempts`. Every attempt keeps the same `webhook-id`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
from standardwebhooks.webhooks import Webhook

from ..config import Config
from ..errors import ApiError, invalid
from ..fetch import Policy, Target, check_url, pinned
from ..metrics import Metrics
from ..state import DeliveryRecord, Store
from .caller import Caller
from .task_views import TaskViews

log = logging.getLogger("imagegate")
SEND_AT_ONCE = 8  # deliveries one replica attempts concurrently
MAX_RETRY_AFTER_S = 86_400
PARAM = "webhook_url"


class Webhooks:
    def __init__(self, cfg: Config, store: Store, views: TaskViews, metrics: Metrics) -> None:
        self.cfg, self.store, self.views, self.metrics = cfg, store, views, metrics
        hooks = cfg.webhooks
        self.policy = Policy(max_bytes=0, timeout_s=hooks.timeout_s, allow_http=hooks.allow_http,
                             allow_private=hooks.allow_private)
        self.replica = "whr_" + secrets.token_hex(8)
        self._loop: asyncio.Task[None] | None = None

    # -- at submission

    async def check(self, url: str, caller: Caller) -> tuple[str, str]:
        """The callback of an async request, or a 400: (url, the base URL of the event's links)."""
        if not self.cfg.webhooks.enabled:
            raise invalid("webhooks are turned off on this gateway (webhooks.enabled)", PARAM,
                          code="webhooks_disabled")
        if len(url) > 2048:
            raise invalid("'webhook_url' is longer than 2048 characters", PARAM, code="invalid_webhook_url")
        await check_url(url, PARAM, self.policy, kind="webhook")
        scope = caller.owner or "-"
        if await self._secret(scope) is None:
            why = ("set webhooks.secret (whsec_…) in the configuration" if caller.owner is None else
                   "make one with `imagegate keys webhook-secret KEY_ID` or POST /admin/keys/{id}/webhook-secret")
            raise invalid(f"this key has no webhook signing secret: {why}", PARAM, code="webhook_secret_missing")
        if await self.store.webhook_disabled(scope, url):
            raise invalid("the receiver at this webhook_url answered 410 Gone, so it is disabled for this key "
                          "(a new webhook secret enables it again)", PARAM, code="webhook_url_disabled")
        return url, caller.base_url

    async def _secret(self, scope: str) -> str | None:
        if scope == "-":
            return self.cfg.webhooks.secret or None
        return await self.store.webhook_secret(scope)

    # -- the sender

    async def start(self) -> None:
        self._loop = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                await self.send_due()
            except Exception:  # the store was away for a moment: the next round tries again
                log.exception("webhook sender failed")
            await asyncio.sleep(self.cfg.webhooks.poll_s)

    async def send_due(self) -> int:
        """Claim and attempt the deliveries that are due now; how many were attempted."""
        lease_until = time.time() + self.cfg.webhooks.timeout_s * 2 + 5  # past it, another replica may try
        claimed = [found for delivery_id in await self.store.due_deliveries(SEND_AT_ONCE)
                   if (found := await self.store.claim_delivery(delivery_id, self.replica, lease_until))]
        await asyncio.gather(*(self._attempt(delivery) for delivery in claimed))
        return len(claimed)

    async def _attempt(self, delivery: DeliveryRecord) -> None:
        payload = delivery.payload or await self._event(delivery)
        status: int | None = None
        retry_after: float | None = None
        error: str | None = None
        secret = await self._secret(delivery.scope)
        try:
            if secret is None:
                raise ApiError(400, "the key has no webhook signing secret any more", code="webhook_secret_missing")
            target = await check_url(delivery.url, PARAM, self.policy, kind="webhook")
            status, retry_after = await self._post(target, delivery.id, payload, secret)
            if not 200 <= status < 300:
                error = f"the receiver answered HTTP {status}"
        except ApiError as exc:
            error = exc.message
        except httpx.HTTPError as exc:
            error = f"the request failed ({type(exc).__name__})"
        await self._record(delivery, payload, status, retry_after, error)

    async def _record(self, delivery: DeliveryRecord, payload: str, status: int | None, retry_after: float | None,
                      error: str | None) -> None:
        attempts = delivery.attempts + 1
        next_at = time.time()
        if status is not None and 200 <= status < 300:
            outcome = "delivered"
        elif status == 410:
            outcome = "disabled"
        elif attempts >= self.cfg.webhooks.max_attempts:
            outcome = "failed"
        else:
            outcome = "pending"
            next_at += retry_after if retry_after is not None else self._backoff(attempts)
        await self.store.delivery_attempted(delivery.id, self.replica, status=outcome, payload=payload,
                                            http_status=status, error=error, next_attempt_at=next_at)
        if outcome == "disabled":
            await self.store.disable_webhook(delivery.scope, delivery.url)
        self.metrics.webhooks.labels("retrying" if outcome == "pending" else outcome).inc()
        if outcome != "delivered":
            log.warning("webhook %s of task %s, attempt %d: %s (%s)", delivery.id, delivery.task_id, attempts,
                        error or status, outcome)

    def _backoff(self, attempts: int) -> float:
        """The wait after attempt `attempts`, with ±10% jitter so that many retries spread out."""
        schedule = self.cfg.webhooks.backoff_s
        wait = schedule[min(attempts - 1, len(schedule) - 1)]
        return wait * random.uniform(0.9, 1.1)

    async def _post(self, target: Target, webhook_id: str, payload: str, secret: str) -> tuple[int, float | None]:
        """POST to the checked address (each one in turn if a connect fails); its status and Retry-After."""
        now = datetime.now(tz=UTC)
        headers = {"content-type": "application/json", "user-agent": "imagegate-webhooks",
                   "webhook-id": webhook_id, "webhook-timestamp": str(int(now.timestamp())),
                   "webhook-signature": Webhook(secret).sign(webhook_id, now, payload)}
        last: httpx.HTTPError | None = None
        for address in target.addresses:
            url, pin_headers, extensions = pinned(target, address)
            try:
                # trust_env=False: a proxy would resolve the name again, undoing the check.
                async with httpx.AsyncClient(trust_env=False, follow_redirects=False,
                                             timeout=self.cfg.webhooks.timeout_s) as client:
                    answer = await client.post(url, content=payload.encode(), extensions=extensions,
                                               headers={**headers, "host": pin_headers["host"]})
                return answer.status_code, _retry_after(answer) if answer.status_code in (429, 503) else None
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def _event(self, delivery: DeliveryRecord) -> str:
        """The event body, made once at the first attempt and kept: every attempt sends the same."""
        task = await self.store.get_task(delivery.task_id)
        callback = await self.store.webhook_of_task(delivery.task_id)
        data: dict[str, Any] = {"id": delivery.task_id}
        if task is not None:
            data = self.views.render(task, callback[1] if callback else self.cfg.server.public_url,
                                     links_only=True)
        return orjson.dumps({"type": delivery.event, "timestamp": datetime.now(tz=UTC).isoformat(),
                             "data": data}).decode()


def _retry_after(answer: httpx.Response) -> float | None:
    value = answer.headers.get("retry-after", "")
    try:
        return max(0.0, min(float(value), MAX_RETRY_AFTER_S))
    except ValueError:
        return None  # an HTTP date, or nothing: the backoff schedule decides
