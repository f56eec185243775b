"""The async store: SQLAlchemy Core over SQLite (pysqlite on worker threads, the default) or asyncpg."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from . import credit, holds, keys, limits, pg_credit, preferences, replays, tasks, webhooks
from .keygen import new_webhook_secret
from .records import (
    AdmitOutcome,
    DeliveryRecord,
    KeyRecord,
    LedgerEntry,
    Replay,
    StateError,
    TaskRecord,
)
from .replays import Claim
from .runner import AsyncRunner, Runner, ThreadRunner
from .schema import migrate

_DRIVERS = {"sqlite": "sqlite", "postgresql": "postgresql+asyncpg", "postgres": "postgresql+asyncpg"}
log = logging.getLogger("imagegate.state")
DELIVERIES_KEPT_S = 7 * 86_400  # a finished delivery's record, for the task view and the operator
GATEWAY_SCOPE = "~gateway"  # preferences of the gateway itself: no key id starts with "~"
_MIGRATE_TRIES = 5  # SQLite: replicas (or `serve --workers`) starting together may race to migrate
# Connections kept open: every metered request runs two short transactions, and at the default of
# five a burst of 32 requests opened and closed overflow connections (a file, or a login) each.
_POOL: dict[str, Any] = {"pool_size": 20, "max_overflow": 10}


def driver_url(url: str) -> sa.URL:
    """`sqlite:///path` and `postgresql://…` as the config writes them → the drivers the store
    uses: pysqlite (on worker threads, runner.py) and asyncpg."""
    parsed = make_url(url)
    backend = parsed.drivername.split("+")[0]
    if backend not in _DRIVERS:
        raise StateError(f"state.url: unsupported database {backend!r} (sqlite or postgresql)")
    return parsed.set(drivername=_DRIVERS[backend])


def _runner(url: sa.URL, schema: str | None) -> Runner:
    # A schema of our own (tests; several gateways in one database) without naming it in every table.
    options = {"schema_translate_map": {None: schema}} if schema else {}
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        # Wait for a writer instead of failing at once: the gateway and the CLI share the file.
        engine = sa.create_engine(url, connect_args={"timeout": 30}, **_POOL)
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return ThreadRunner(engine.execution_options(**options))
    # Connections idle in autocommit: the pre-ping of a checkout is then one round trip, not
    # BEGIN, ping and ROLLBACK, and the credit path's single statements need no more (pg_credit.py).
    pg = create_async_engine(url, pool_pre_ping=True, isolation_level="AUTOCOMMIT", **_POOL)
    return AsyncRunner(pg.execution_options(**options))


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
    The statements themselves are plain synchronous functions over a connection in keys.py,
    holds.py, limits.py, credit.py, preferences.py, replays.py and tasks.py; the runner
    (runner.py) runs each as one transaction."""

    def __init__(self, runner: Runner) -> None:
        # Tests and tools run statement functions of their own with it (runner.py).
        self.runner = runner
        # PostgreSQL: the credit path's common case is a single statement (pg_credit.py).
        self._single = runner if isinstance(runner, AsyncRunner) else None

    async def close(self) -> None:
        await self.runner.close()

    async def ping(self) -> bool:
        """Readiness: can the store answer a query now."""
        try:
            await self.runner.read(_select_one)
            return True
        except (DBAPIError, OSError):
            return False

    # -- keys and their ledger

    async def create_key(self, name: str, credits_micros: int | None = None,
                         models: Sequence[str] | None = None, rpm: int | None = None,
                         concurrency: int | None = None) -> tuple[KeyRecord, str]:
        """A new key and its secret; the secret is returned here once and never stored."""
        return await self.runner.write(keys.create, name, credits_micros, models, rpm, concurrency)

    async def get_key(self, key_id: str) -> KeyRecord:
        return await self.runner.read(keys.get, key_id)

    async def list_keys(self) -> list[KeyRecord]:
        return await self.runner.read(keys.list_all)

    async def revoke(self, key_id: str) -> KeyRecord:
        return await self.runner.write(keys.revoke, key_id)

    async def topup(self, key_id: str, micros: int, reference: str | None = None) -> KeyRecord:
        if micros <= 0:
            raise StateError("a topup must be more than zero")
        return await self.runner.write(keys.top_up, key_id, micros, reference)

    async def authenticate(self, secret: str) -> KeyRecord | None:
        """The live key whose secret this is, else None (unknown, malformed or revoked alike)."""
        return await self.runner.read(keys.by_secret, secret)

    async def balance(self, key_id: str) -> int | None:
        return (await self.get_key(key_id)).balance_micros

    async def ledger(self, key_id: str) -> list[LedgerEntry]:
        return await self.runner.read(keys.entries, key_id)

    async def recent_ledger(self, key_id: str, limit: int = 100) -> list[LedgerEntry]:
        """The key's ledger, most recent first."""
        return await self.runner.read(keys.entries, key_id, newest_first=True, limit=limit)

    # -- one request's admission and settlement: a round trip each

    async def admit(self, key_id: str, *, rpm: int | None, concurrency: int | None, slot_ttl_s: float,
                    hold_micros: int | None, reference: str | None) -> AdmitOutcome:
        """Rate limit, concurrency slot and credit hold of one request, in one transaction (on
        PostgreSQL, a hold without limits is one statement). A refusal takes nothing (the rate
        count stays: the request was made)."""
        if self._single is not None and rpm is None and concurrency is None and hold_micros is not None:
            return await self._single.single(pg_credit.admit, key_id, hold_micros, reference)
        return await self.runner.write(credit.admit, key_id, rpm=rpm, concurrency=concurrency, slot_ttl_s=slot_ttl_s,
                                       hold_micros=hold_micros, reference=reference)

    async def settle_request(self, hold_id: str | None, captured_micros: int, slot_id: str | None) -> bool:
        """`settle` the hold (if any) and free the slot (if any), in one transaction (on
        PostgreSQL, one statement)."""
        if self._single is not None:
            return await self._single.single(pg_credit.settle, hold_id, captured_micros, slot_id)
        return await self.runner.write(credit.settle, hold_id, captured_micros, slot_id)

    # -- credit holds

    async def hold(self, key_id: str, micros: int, reference: str | None = None) -> str:
        """Take `micros` from the key's balance, or raise InsufficientCredit having taken nothing."""
        return await self.runner.write(holds.take, key_id, micros, reference)

    async def settle(self, hold_id: str, captured_micros: int) -> bool:
        """Capture `captured_micros` (at most the hold) and give the rest back; only the first
        settle of a hold moves money, later ones return False."""
        return await self.runner.write(holds.settle, hold_id, captured_micros)

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
        stale = await self.runner.read(holds.placed_before, time.time() - older_than_s)
        released = 0
        for hold_id in stale:
            try:  # one hold that cannot be settled must not keep the others from it
                released += await self.release(hold_id)
            except Exception:
                log.exception("could not release stale hold %s", hold_id)
        return released

    async def held(self, key_id: str) -> list[str]:
        """The ids of the key's holds not settled yet."""
        return await self.runner.read(holds.held, key_id)

    # -- per-key limits

    async def count_request(self, key_id: str, rpm: int) -> int | None:
        """One request in the key's clock minute: None when allowed, else seconds to wait."""
        return await self.runner.write(limits.count_in, key_id, rpm)

    async def acquire_slot(self, key_id: str, limit: int, ttl_s: float) -> str | None:
        """A concurrency slot on the key, or None when `limit` are taken."""
        return await self.runner.write(limits.acquire_slot, key_id, limit, ttl_s)

    async def release_slot(self, slot_id: str) -> None:
        await self.runner.write(limits.release_slot, slot_id)

    async def extend_slot(self, slot_id: str, ttl_s: float) -> None:
        await self.runner.write(limits.extend_slot, slot_id, ttl_s)

    # -- Idempotency-Key records

    async def claim_idempotency(self, scope: str, key: str, fingerprint: str, owner: str,
                                lease_s: float, ttl_s: float) -> Claim:
        return await replays.claim(self.runner, scope, key, fingerprint, owner, lease_s, ttl_s)

    async def complete_idempotency(self, scope: str, key: str, owner: str, response: Replay) -> None:
        await self.runner.write(replays.complete, scope, key, owner, response)

    async def abandon_idempotency(self, scope: str, key: str, owner: str) -> None:
        """The first try failed: forget it, so that a retry with the same key runs again."""
        await self.runner.write(replays.abandon, scope, key, owner)

    async def delete_expired_idempotency(self) -> int:
        return await self.runner.write(replays.delete_expired)

    # -- per-caller preferences

    async def preferences(self, scope: str) -> dict[str, str]:
        return await self.runner.read(preferences.of, scope)

    async def set_preference(self, scope: str, name: str, value: str) -> None:
        await preferences.put(self.runner, scope, name, value)

    async def shared_secret(self, name: str, candidate: str) -> str:
        """A gateway-wide secret every replica on this store shares: `candidate`, if none was kept."""
        return await preferences.first(self.runner, GATEWAY_SCOPE, name, candidate)

    # -- async tasks

    async def create_task(self, *, task_id: str, key_id: str | None, model: str, operation: str,
                          response_format: str, hold_id: str | None, slot_id: str | None,
                          billing: dict[str, Any], ttl_s: float, owner: str, lease_s: float,
                          webhook: tuple[str, str] | None = None) -> TaskRecord:
        return await self.runner.write(tasks.create, task_id=task_id, key_id=key_id, model=model, operation=operation,
                                       response_format=response_format, hold_id=hold_id, slot_id=slot_id,
                                       billing=billing, ttl_s=ttl_s, owner=owner, lease_s=lease_s, webhook=webhook)

    async def get_task(self, task_id: str) -> TaskRecord | None:
        return await self.runner.read(tasks.get, task_id)

    async def start_task(self, task_id: str, owner: str) -> bool:
        """queued → running; False when it was cancelled (or taken) meanwhile."""
        return await self.runner.write(tasks.start, task_id, owner)

    async def task_progress(self, task_id: str, progress: float) -> None:
        await self.runner.write(tasks.progress, task_id, progress)

    async def finish_task(self, task_id: str, status: str, *, result: dict[str, Any] | None = None,
                          error: dict[str, Any] | None = None, captured_micros: int = 0,
                          owner: str | None = None, lapsed_before: float | None = None,
                          billing: dict[str, Any] | None = None) -> bool:
        """End an active task, settling its hold and freeing its slot in the same transaction."""
        return await self.runner.write(tasks.finish, task_id, status, result=result, error=error,
                                       captured_micros=captured_micros, owner=owner,
                                       lapsed_before=lapsed_before, billing=billing)

    async def renew_leases(self, owner: str, task_ids: set[str], lease_s: float) -> set[str]:
        """Extend this replica's running tasks' leases; the ones still active."""
        return await self.runner.write(tasks.renew, owner, task_ids, lease_s)

    async def fail_abandoned_tasks(self) -> list[str]:
        """Fail (and refund) every active task whose lease lapsed: its replica is gone."""
        now = time.time()
        lapsed = await self.runner.read(tasks.lapsed, now)
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
        return await self.runner.write(_delete_expired)

    # -- webhooks: the outbox and the keys' secrets

    async def webhook_of_task(self, task_id: str) -> tuple[str, str, DeliveryRecord | None] | None:
        """(URL, base URL, its delivery once the task ended) of a task that asked for a webhook."""
        return await self.runner.read(_webhook_of_task, task_id)

    async def due_deliveries(self, limit: int) -> list[str]:
        return await self.runner.read(webhooks.due, time.time(), limit)

    async def claim_delivery(self, delivery_id: str, owner: str, until: float) -> DeliveryRecord | None:
        return await self.runner.write(webhooks.claim, delivery_id, owner, until)

    async def delivery_attempted(self, delivery_id: str, owner: str, *, status: str, payload: str,
                                 http_status: int | None, error: str | None, next_attempt_at: float) -> bool:
        return await self.runner.write(webhooks.attempted, delivery_id, owner, status=status, payload=payload,
                                       http_status=http_status, error=error, next_attempt_at=next_attempt_at)

    async def disable_webhook(self, scope: str, url: str) -> None:
        await self.runner.write(webhooks.disable, scope, url)

    async def webhook_disabled(self, scope: str, url: str) -> bool:
        return await self.runner.read(webhooks.is_disabled, scope, url)

    async def webhook_secret(self, scope: str) -> str | None:
        return await self.runner.read(webhooks.secret_of, scope)

    async def rotate_webhook_secret(self, key_id: str) -> str:
        """A new signing secret for the key's webhooks (shown to the client once); KeyNotFound."""
        secret = new_webhook_secret()
        await self.runner.write(_set_webhook_secret, key_id, secret)
        return secret


def _select_one(conn: Connection) -> None:
    conn.execute(sa.select(1))


def _delete_expired(conn: Connection) -> int:
    gone = tasks.delete_expired(conn)
    webhooks.delete_expired(conn, time.time() - DELIVERIES_KEPT_S)
    return gone


def _webhook_of_task(conn: Connection, task_id: str) -> tuple[str, str, DeliveryRecord | None] | None:
    callback = webhooks.callback_of(conn, task_id)
    if callback is None:
        return None
    return callback[0], callback[1], webhooks.of_task(conn, task_id)


def _set_webhook_secret(conn: Connection, key_id: str, secret: str) -> None:
    keys.get(conn, key_id)  # KeyNotFound
    webhooks.set_secret(conn, key_id, secret)


async def probe_store(url: str) -> str | None:
    """`check-config --probe`: None when the database answers (nothing is created or migrated)."""
    store = Store(_runner(driver_url(url), None))
    try:
        if await store.ping():
            return None
        return f"the state store at {make_url(url).render_as_string()} does not answer"
    finally:
        await store.close()


async def open_store(url: str, *, schema: str | None = None) -> Store:
    """Connect and bring the schema up to date (idempotent: a second open changes nothing)."""
    store = Store(_runner(driver_url(url), schema))
    for attempt in range(_MIGRATE_TRIES):
        try:
            await store.runner.write(migrate)
            break
        except Exception as exc:
            # SQLite: another process created the tables or held the write lock between our check
            # and our write; look again. PostgreSQL serialises on the advisory lock instead.
            if not isinstance(exc, DBAPIError) or attempt == _MIGRATE_TRIES - 1 \
                    or not isinstance(store.runner, ThreadRunner):
                await store.close()
                raise
            await asyncio.sleep(0.05 * (attempt + 1))
    return store
