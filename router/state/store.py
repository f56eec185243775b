"""The async store: SQLAlchemy Core over aiosqlite (default) or asyncpg, one engine per gateway."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from . import holds, keys, limits, pg_credit, preferences, replays, tasks, webhooks
from .keygen import new_webhook_secret
from .records import (
    AdmitOutcome,
    DeliveryRecord,
    InsufficientCredit,
    KeyRecord,
    KeyRevoked,
    LedgerEntry,
    Replay,
    StateError,
    TaskRecord,
)
from .replays import Claim
from .schema import migrate

_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg", "postgres": "postgresql+asyncpg"}
log = logging.getLogger("imagegate.state")
DELIVERIES_KEPT_S = 7 * 86_400  # a finished delivery's record, for the task view and the operator
GATEWAY_SCOPE = "~gateway"  # preferences of the gateway itself: no key id starts with "~"
_MIGRATE_TRIES = 5  # SQLite: replicas (or `serve --workers`) starting together may race to migrate
# Connections kept open: every metered request runs two short transactions, and at the default of
# five a burst of 32 requests opened and closed overflow connections (a thread, or a login) each.
_POOL: dict[str, Any] = {"pool_size": 20, "max_overflow": 10}


def async_url(url: str) -> sa.URL:
    """`sqlite:///path` and `postgresql://…` as the config writes them → their async drivers."""
    parsed = make_url(url)
    backend = parsed.drivername.split("+")[0]
    if backend not in _DRIVERS:
        raise StateError(f"state.url: unsupported database {backend!r} (sqlite or postgresql)")
    return parsed.set(drivername=_DRIVERS[backend])


def _engine(url: sa.URL, schema: str | None) -> AsyncEngine:
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        # Wait for a writer instead of failing at once: the gateway and the CLI share the file.
        engine = create_async_engine(url, connect_args={"timeout": 30}, **_POOL)
        sa.event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    else:
        # Connections idle in autocommit: the pre-ping of a checkout is then one round trip, not
        # BEGIN, ping and ROLLBACK, and the credit path's single statements need no more (Store).
        engine = create_async_engine(url, pool_pre_ping=True, isolation_level="AUTOCOMMIT", **_POOL)
    # A schema of our own (tests; several gateways in one database) without naming it in every table.
    return engine.execution_options(schema_translate_map={None: schema}) if schema else engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL: readers never wait for the writer, and a commit appends to the log instead of
    rewriting pages. synchronous=NORMAL in WAL mode survives a process crash; only a power loss can
    roll back the last commits, never corrupt the file. Deployments that need more use PostgreSQL."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class Store:
    """The state store's one interface. Every public method is one transaction (the sweeps, one per
    item), so a balance and its ledger rows, or a task's end and its money, always change together.
    The statements themselves are plain functions over a connection in keys.py, holds.py,
    limits.py, preferences.py, replays.py and tasks.py."""

    def __init__(self, engine: AsyncEngine) -> None:
        postgresql = engine.dialect.name == "postgresql"
        # PostgreSQL: the credit path is single statements on `engine` as it comes (autocommit:
        # pg_credit.py), and every transaction asks for READ COMMITTED, which the statements are
        # written for. A view of one pool, not a second pool.
        self._single = engine if postgresql else None
        self.engine = engine.execution_options(isolation_level="READ COMMITTED") if postgresql else engine
        # SQLite takes one writer at a time and makes the others sleep and retry (its busy
        # handler, up to 100 ms a try): 32 requests of one gateway contending that way had a p99
        # of half a second. Queued here instead, in order, they wait only for each other
        # (README, Performance). Other processes on the file still meet the busy handler.
        self._one_writer = asyncio.Lock() if engine.dialect.name == "sqlite" else None

    @contextlib.asynccontextmanager
    async def _begin(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction (one at a time per process on SQLite)."""
        async with self._one_writer or contextlib.nullcontext(), self.engine.begin() as conn:
            yield conn

    async def close(self) -> None:
        await self.engine.dispose()

    async def ping(self) -> bool:
        """Readiness: can the store answer a query now."""
        try:
            async with self.engine.connect() as conn:
                await conn.execute(sa.select(1))
            return True
        except (DBAPIError, OSError):
            return False

    # -- keys and their ledger

    async def create_key(self, name: str, credits_micros: int | None = None,
                         models: Sequence[str] | None = None, rpm: int | None = None,
                         concurrency: int | None = None) -> tuple[KeyRecord, str]:
        """A new key and its secret; the secret is returned here once and never stored."""
        async with self._begin() as conn:
            return await keys.create(conn, name, credits_micros, models, rpm, concurrency)

    async def get_key(self, key_id: str) -> KeyRecord:
        async with self.engine.connect() as conn:
            return await keys.get(conn, key_id)

    async def list_keys(self) -> list[KeyRecord]:
        async with self.engine.connect() as conn:
            return await keys.list_all(conn)

    async def revoke(self, key_id: str) -> KeyRecord:
        async with self._begin() as conn:
            return await keys.revoke(conn, key_id)

    async def topup(self, key_id: str, micros: int, reference: str | None = None) -> KeyRecord:
        if micros <= 0:
            raise StateError("a topup must be more than zero")
        async with self._begin() as conn:
            await keys.post(conn, key_id, "topup", micros, reference)
            return await keys.get(conn, key_id)

    async def authenticate(self, secret: str) -> KeyRecord | None:
        """The live key whose secret this is, else None (unknown, malformed or revoked alike)."""
        async with self.engine.connect() as conn:
            return await keys.by_secret(conn, secret)

    async def balance(self, key_id: str) -> int | None:
        return (await self.get_key(key_id)).balance_micros

    async def ledger(self, key_id: str) -> list[LedgerEntry]:
        async with self.engine.connect() as conn:
            return await keys.entries(conn, key_id)

    async def recent_ledger(self, key_id: str, limit: int = 100) -> list[LedgerEntry]:
        """The key's ledger, most recent first."""
        async with self.engine.connect() as conn:
            return await keys.entries(conn, key_id, newest_first=True, limit=limit)

    # -- one request's admission and settlement: a round trip each

    async def admit(self, key_id: str, *, rpm: int | None, concurrency: int | None, slot_ttl_s: float,
                    hold_micros: int | None, reference: str | None) -> AdmitOutcome:
        """Rate limit, concurrency slot and credit hold of one request, in one transaction (on
        PostgreSQL, a hold without limits is one statement). A refusal takes nothing (the rate
        count stays: the request was made)."""
        if self._single is not None and rpm is None and concurrency is None and hold_micros is not None:
            async with self._single.connect() as conn:
                return await pg_credit.admit(conn, key_id, hold_micros, reference)
        async with self._begin() as conn:
            if rpm is not None and (wait_s := await limits.count_in(conn, key_id, rpm)) is not None:
                return AdmitOutcome("rate", wait_s=wait_s)
            slot_id = None
            if concurrency is not None:
                slot_id = await limits.acquire_slot(conn, key_id, concurrency, slot_ttl_s)
                if slot_id is None:
                    return AdmitOutcome("concurrency")
            hold_id = None
            if hold_micros is not None:
                try:
                    hold_id = await holds.take(conn, key_id, hold_micros, reference)
                except (InsufficientCredit, KeyRevoked) as refused:
                    if slot_id is not None:
                        await limits.release_slot(conn, slot_id)
                    return AdmitOutcome("credit" if isinstance(refused, InsufficientCredit) else "revoked")
            return AdmitOutcome(slot_id=slot_id, hold_id=hold_id)

    async def settle_request(self, hold_id: str | None, captured_micros: int, slot_id: str | None) -> bool:
        """`settle` the hold (if any) and free the slot (if any), in one transaction (on
        PostgreSQL, one statement)."""
        if self._single is not None:
            async with self._single.connect() as conn:
                return await pg_credit.settle(conn, hold_id, captured_micros, slot_id)
        async with self._begin() as conn:
            settled = hold_id is not None and await holds.settle(conn, hold_id, captured_micros)
            if slot_id is not None:
                await limits.release_slot(conn, slot_id)
            return settled

    # -- credit holds

    async def hold(self, key_id: str, micros: int, reference: str | None = None) -> str:
        """Take `micros` from the key's balance, or raise InsufficientCredit having taken nothing."""
        async with self._begin() as conn:
            return await holds.take(conn, key_id, micros, reference)

    async def settle(self, hold_id: str, captured_micros: int) -> bool:
        """Capture `captured_micros` (at most the hold) and give the rest back; only the first
        settle of a hold moves money, later ones return False."""
        async with self._begin() as conn:
            return await holds.settle(conn, hold_id, captured_micros)

    async def release(self, hold_id: str) -> bool:
        """Give the whole hold back (a failed or cancelled request)."""
        return await self.settle(hold_id, 0)

    async def release_stale_holds(self, older_than_s: float) -> int:
        """Release every hold still `held` that was placed more than `older_than_s` ago; the number.

        Called when a gateway starts, to undo holds left by a crash: the gateway passes
        the longest a request or task may run (`Config.longest_run_s`) + a grace period, after which
        none can still be running on any replica. A task's hold is usually
        released sooner, by the sweep that fails its lapsed lease; settling twice moves money once.
        """
        async with self.engine.connect() as conn:
            stale = await holds.placed_before(conn, time.time() - older_than_s)
        released = 0
        for hold_id in stale:
            try:  # one hold that cannot be settled must not keep the others from it
                released += await self.release(hold_id)
            except Exception:
                log.exception("could not release stale hold %s", hold_id)
        return released

    async def held(self, key_id: str) -> list[str]:
        """The ids of the key's holds not settled yet."""
        async with self.engine.connect() as conn:
            return await holds.held(conn, key_id)

    # -- per-key limits

    async def count_request(self, key_id: str, rpm: int) -> int | None:
        """One request in the key's clock minute: None when allowed, else seconds to wait."""
        async with self._begin() as conn:
            return await limits.count_in(conn, key_id, rpm)

    async def acquire_slot(self, key_id: str, limit: int, ttl_s: float) -> str | None:
        """A concurrency slot on the key, or None when `limit` are taken."""
        async with self._begin() as conn:
            return await limits.acquire_slot(conn, key_id, limit, ttl_s)

    async def release_slot(self, slot_id: str) -> None:
        async with self._begin() as conn:
            await limits.release_slot(conn, slot_id)

    async def extend_slot(self, slot_id: str, ttl_s: float) -> None:
        async with self._begin() as conn:
            await limits.extend_slot(conn, slot_id, ttl_s)

    # -- Idempotency-Key records

    async def claim_idempotency(self, scope: str, key: str, fingerprint: str, owner: str,
                                lease_s: float, ttl_s: float) -> Claim:
        return await replays.claim(self._begin, scope, key, fingerprint, owner, lease_s, ttl_s)

    async def complete_idempotency(self, scope: str, key: str, owner: str, response: Replay) -> None:
        async with self._begin() as conn:
            await replays.complete(conn, scope, key, owner, response)

    async def abandon_idempotency(self, scope: str, key: str, owner: str) -> None:
        """The first try failed: forget it, so that a retry with the same key runs again."""
        async with self._begin() as conn:
            await replays.abandon(conn, scope, key, owner)

    async def delete_expired_idempotency(self) -> int:
        async with self._begin() as conn:
            return await replays.delete_expired(conn)

    # -- per-caller preferences

    async def preferences(self, scope: str) -> dict[str, str]:
        async with self.engine.connect() as conn:
            return await preferences.of(conn, scope)

    async def set_preference(self, scope: str, name: str, value: str) -> None:
        await preferences.put(self._begin, scope, name, value)

    async def shared_secret(self, name: str, candidate: str) -> str:
        """A gateway-wide secret every replica on this store shares: `candidate`, if none was kept."""
        return await preferences.first(self._begin, GATEWAY_SCOPE, name, candidate)

    # -- async tasks

    async def create_task(self, *, task_id: str, key_id: str | None, model: str, operation: str,
                          response_format: str, hold_id: str | None, slot_id: str | None,
                          billing: dict[str, Any], ttl_s: float, owner: str, lease_s: float,
                          webhook: tuple[str, str] | None = None) -> TaskRecord:
        async with self._begin() as conn:
            return await tasks.create(conn, task_id=task_id, key_id=key_id, model=model, operation=operation,
                                      response_format=response_format, hold_id=hold_id, slot_id=slot_id,
                                      billing=billing, ttl_s=ttl_s, owner=owner, lease_s=lease_s, webhook=webhook)

    async def get_task(self, task_id: str) -> TaskRecord | None:
        async with self.engine.connect() as conn:
            return await tasks.get(conn, task_id)

    async def start_task(self, task_id: str, owner: str) -> bool:
        """queued → running; False when it was cancelled (or taken) meanwhile."""
        async with self._begin() as conn:
            return await tasks.start(conn, task_id, owner)

    async def task_progress(self, task_id: str, progress: float) -> None:
        async with self._begin() as conn:
            await tasks.progress(conn, task_id, progress)

    async def finish_task(self, task_id: str, status: str, *, result: dict[str, Any] | None = None,
                          error: dict[str, Any] | None = None, captured_micros: int = 0,
                          owner: str | None = None, lapsed_before: float | None = None,
                          billing: dict[str, Any] | None = None) -> bool:
        """End an active task, settling its hold and freeing its slot in the same transaction."""
        async with self._begin() as conn:
            return await tasks.finish(conn, task_id, status, result=result, error=error,
                                      captured_micros=captured_micros, owner=owner,
                                      lapsed_before=lapsed_before, billing=billing)

    async def renew_leases(self, owner: str, task_ids: set[str], lease_s: float) -> set[str]:
        """Extend this replica's running tasks' leases; the ones still active."""
        async with self._begin() as conn:
            return await tasks.renew(conn, owner, task_ids, lease_s)

    async def fail_abandoned_tasks(self) -> list[str]:
        """Fail (and refund) every active task whose lease lapsed: its replica is gone."""
        now = time.time()
        async with self.engine.connect() as conn:
            lapsed = await tasks.lapsed(conn, now)
        failed = []
        for task_id in lapsed:
            try:  # one task that cannot be ended must not keep the others from it
                if await self.finish_task(task_id, "failed", error=tasks.ABANDONED, lapsed_before=now):
                    failed.append(task_id)
            except Exception:
                log.exception("could not fail abandoned task %s", task_id)
        return failed

    async def delete_expired_tasks(self) -> int:
        """Forget finished tasks past their TTL (their artifacts expire on their own), and finished
        webhook deliveries as old."""
        async with self._begin() as conn:
            gone = await tasks.delete_expired(conn)
            await webhooks.delete_expired(conn, time.time() - DELIVERIES_KEPT_S)
            return gone

    # -- webhooks: the outbox and the keys' secrets

    async def webhook_of_task(self, task_id: str) -> tuple[str, str, DeliveryRecord | None] | None:
        """(URL, base URL, its delivery once the task ended) of a task that asked for a webhook."""
        async with self.engine.connect() as conn:
            callback = await webhooks.callback_of(conn, task_id)
            if callback is None:
                return None
            return callback[0], callback[1], await webhooks.of_task(conn, task_id)

    async def due_deliveries(self, limit: int) -> list[str]:
        async with self.engine.connect() as conn:
            return await webhooks.due(conn, time.time(), limit)

    async def claim_delivery(self, delivery_id: str, owner: str, until: float) -> DeliveryRecord | None:
        async with self._begin() as conn:
            return await webhooks.claim(conn, delivery_id, owner, until)

    async def delivery_attempted(self, delivery_id: str, owner: str, *, status: str, payload: str,
                                 http_status: int | None, error: str | None, next_attempt_at: float) -> bool:
        async with self._begin() as conn:
            return await webhooks.attempted(conn, delivery_id, owner, status=status, payload=payload,
                                            http_status=http_status, error=error, next_attempt_at=next_attempt_at)

    async def disable_webhook(self, scope: str, url: str) -> None:
        async with self._begin() as conn:
            await webhooks.disable(conn, scope, url)

    async def webhook_disabled(self, scope: str, url: str) -> bool:
        async with self.engine.connect() as conn:
            return await webhooks.is_disabled(conn, scope, url)

    async def webhook_secret(self, scope: str) -> str | None:
        async with self.engine.connect() as conn:
            return await webhooks.secret_of(conn, scope)

    async def rotate_webhook_secret(self, key_id: str) -> str:
        """A new signing secret for the key's webhooks (shown to the client once); KeyNotFound."""
        secret = new_webhook_secret()
        async with self._begin() as conn:
            await keys.get(conn, key_id)
            await webhooks.set_secret(conn, key_id, secret)
        return secret


def _migrate(conn: Connection) -> None:
    migrate(conn)


async def probe_store(url: str) -> str | None:
    """`check-config --probe`: None when the database answers (nothing is created or migrated)."""
    store = Store(_engine(async_url(url), None))
    try:
        return None if await store.ping() else f"the state store at {make_url(url).render_as_string()} " \
                                                 "does not answer"
    finally:
        await store.close()


async def open_store(url: str, *, schema: str | None = None) -> Store:
    """Connect and bring the schema up to date (idempotent: a second open changes nothing)."""
    store = Store(_engine(async_url(url), schema))
    for attempt in range(_MIGRATE_TRIES):
        try:
            async with store.engine.begin() as conn:
                await conn.run_sync(_migrate)
            break
        except Exception as exc:
            # SQLite: another process created the tables or held the write lock between our check
            # and our write; look again. PostgreSQL serialises on the advisory lock instead.
            if not isinstance(exc, DBAPIError) or attempt == _MIGRATE_TRIES - 1 \
                    or store.engine.dialect.name != "sqlite":
                await store.close()
                raise
            await asyncio.sleep(0.05 * (attempt + 1))
    return store
