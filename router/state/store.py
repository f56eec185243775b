"""The async store: SQLAlchemy Core over aiosqlite (default) or asyncpg, one engine per gateway."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from .admission import AdmissionMixin
from .holds import HoldsMixin
from .records import KeyNotFound, KeyRecord, LedgerEntry, LedgerKind, StateError
from .schema import api_keys, ledger, migrate
from .tasks import TasksMixin
from .keygen import DISPLAY_CHARS, hash_secret, looks_like_key, new_key_id, new_secret

_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg", "postgres": "postgresql+asyncpg"}
_MIGRATE_TRIES = 5  # SQLite: replicas (or `serve --workers`) starting together may race to migrate


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
        engine = create_async_engine(url, connect_args={"timeout": 30})
        sa.event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    else:
        engine = create_async_engine(url, pool_pre_ping=True)
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


def _record(row: sa.Row[Any]) -> KeyRecord:
    models = json.loads(row.models) if row.models is not None else None
    return KeyRecord(id=row.id, name=row.name, prefix=row.prefix, created_at=row.created_at,
                     revoked_at=row.revoked_at, balance_micros=row.balance_micros,
                     models=tuple(models) if models is not None else None, rpm=row.rpm,
                     concurrency=row.concurrency)


def _entry(row: sa.Row[Any]) -> LedgerEntry:
    return LedgerEntry(id=row.id, key_id=row.key_id, at=row.at, kind=row.kind,
                       amount_micros=row.amount_micros, reference=row.reference)


def _positive_or_none(value: int | None, what: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise StateError(f"{what} must be a whole number of at least 1")
    return value


class Store(HoldsMixin, TasksMixin, AdmissionMixin):
    """Every public method is one transaction; the balance and its ledger rows change together."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

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

    async def create_key(self, name: str, credits_micros: int | None = None,
                         models: Sequence[str] | None = None, rpm: int | None = None,
                         concurrency: int | None = None) -> tuple[KeyRecord, str]:
        """A new key and its secret; the secret is returned here once and never stored."""
        if not name.strip():
            raise StateError("a key needs a name")
        if credits_micros is not None and credits_micros < 0:
            raise StateError("credits must be zero or more")
        secret, key_id, now = new_secret(), new_key_id(), time.time()
        values = {"id": key_id, "name": name.strip(), "prefix": secret[:DISPLAY_CHARS],
                  "key_hash": hash_secret(secret), "created_at": now, "revoked_at": None,
                  "balance_micros": 0 if credits_micros is not None else None,
                  "models": json.dumps(sorted(set(models))) if models is not None else None,
                  "rpm": _positive_or_none(rpm, "rpm"),
                  "concurrency": _positive_or_none(concurrency, "concurrency")}
        async with self.engine.begin() as conn:
            await conn.execute(api_keys.insert().values(**values))
            if credits_micros:
                await self._post(conn, key_id, "topup", credits_micros, "initial credits")
            record = await self._get(conn, key_id)
        return record, secret

    async def get_key(self, key_id: str) -> KeyRecord:
        async with self.engine.connect() as conn:
            return await self._get(conn, key_id)

    async def list_keys(self) -> list[KeyRecord]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(sa.select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id))
            return [_record(row) for row in rows]

    async def revoke(self, key_id: str) -> KeyRecord:
        """Revoking twice keeps the first time; the key and its ledger stay for the record."""
        async with self.engine.begin() as conn:
            await conn.execute(api_keys.update()
                               .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                               .values(revoked_at=time.time()))
            return await self._get(conn, key_id)

    async def topup(self, key_id: str, micros: int, reference: str | None = None) -> KeyRecord:
        if micros <= 0:
            raise StateError("a topup must be more than zero")
        async with self.engine.begin() as conn:
            await self._post(conn, key_id, "topup", micros, reference)
            return await self._get(conn, key_id)

    async def authenticate(self, secret: str) -> KeyRecord | None:
        """The live key whose secret this is, else None (unknown, malformed or revoked alike)."""
        if not looks_like_key(secret):
            return None
        digest = hash_secret(secret)
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(api_keys).where(api_keys.c.key_hash == digest))).first()
        # The lookup is by hash, so timing says nothing about the secret; compare again anyway so a
        # collation or driver quirk in the WHERE can never let a near-miss through.
        if row is None or not hmac.compare_digest(row.key_hash, digest) or row.revoked_at is not None:
            return None
        return _record(row)

    async def balance(self, key_id: str) -> int | None:
        return (await self.get_key(key_id)).balance_micros

    async def ledger(self, key_id: str) -> list[LedgerEntry]:
        async with self.engine.connect() as conn:
            await self._get(conn, key_id)  # an unknown key is an error, not an empty history
            rows = await conn.execute(sa.select(ledger).where(ledger.c.key_id == key_id).order_by(ledger.c.id))
            return [_entry(row) for row in rows]

    async def _get(self, conn: AsyncConnection, key_id: str) -> KeyRecord:
        row = (await conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id))).first()
        if row is None:
            raise KeyNotFound(key_id)
        return _record(row)

    async def _post(self, conn: AsyncConnection, key_id: str, kind: LedgerKind, amount: int,
                    reference: str | None) -> None:
        """One ledger row and the same change to the balance, in the caller's transaction, so that
        SUM(ledger.amount_micros) == balance_micros for every key that keeps a balance.

        The balance moves by an in-place `balance + amount` (no read-modify-write), so concurrent
        postings from several replicas cannot lose each other. Holds (holds.py) take money with
        their own UPDATE that adds a `balance >= amount` condition, refusing overdrafts atomically.
        """
        done = await conn.execute(api_keys.update()
                                  .where(api_keys.c.id == key_id, api_keys.c.balance_micros.is_not(None))
                                  .values(balance_micros=api_keys.c.balance_micros + amount))
        if done.rowcount != 1:
            await self._get(conn, key_id)  # raises KeyNotFound when that is the reason
            raise StateError(f"API key '{key_id}' is unlimited (it keeps no balance); "
                             "make a key with credits to meter it")
        await conn.execute(ledger.insert().values(key_id=key_id, at=time.time(), kind=kind,
                                                  amount_micros=amount, reference=reference))


def _migrate(conn: Connection) -> None:
    migrate(conn)


async def open_store(url: str, *, schema: str | None = None) -> Store:
    """Connect and bring the schema up to date (idempotent: a second open changes nothing)."""
    engine = _engine(async_url(url), schema)
    for attempt in range(_MIGRATE_TRIES):
        try:
            async with engine.begin() as conn:
                await conn.run_sync(_migrate)
            break
        except Exception as exc:
            # SQLite: another process created the tables or held the write lock between our check
            # and our write; look again. PostgreSQL serialises on the advisory lock instead.
            if not isinstance(exc, DBAPIError) or attempt == _MIGRATE_TRIES - 1 \
                    or engine.dialect.name != "sqlite":
                await engine.dispose()
                raise
            await asyncio.sleep(0.05 * (attempt + 1))
    return Store(engine)
