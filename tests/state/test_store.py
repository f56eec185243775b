"""One set of store tests, run against SQLite and (when reachable) PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from imagegate.router import state
from imagegate.router.state import schema
from imagegate.router.state.store import Store
from tests.state.conftest import Backend

T = TypeVar("T")


def run(backend: Backend, work: Callable[[Store], Awaitable[T]]) -> T:
    """Open the store, run `work`, close it: each call is a fresh start of the gateway."""
    async def main() -> T:
        store = await state.open(backend.url, schema=backend.schema)
        try:
            return await work(store)
        finally:
            await store.close()
    return asyncio.run(main())


async def _tables(store: Store) -> tuple[set[str], int]:
    def look(conn: Connection) -> tuple[set[str], int]:
        names = set(sa.inspect(conn).get_table_names(schema=schema.table_schema(conn)))
        return names, schema.current_version(conn)
    return await store.runner.read(look)


def test_schema_created_and_reopen_is_idempotent(backend: Backend) -> None:
    names, version = run(backend, _tables)
    assert {"schema_version", "api_keys", "ledger"} <= names
    assert version == schema.LATEST
    created = run(backend, lambda s: s.create_key("kept"))
    # Opening again migrates nothing and loses nothing.
    again = run(backend, _tables)
    assert again == (names, version)
    keys = run(backend, lambda s: s.list_keys())
    assert [k.id for k in keys] == [created[0].id]


def test_create_authenticate_revoke(backend: Backend) -> None:
    async def work(store: Store) -> None:
        key, secret = await store.create_key("alice", 5_000_000, ["demo"], rpm=60, concurrency=2)
        assert secret.startswith("ig_") and len(secret) == 35
        assert key.prefix == secret[:8] and key.models == ("demo",) and (key.rpm, key.concurrency) == (60, 2)
        assert key.balance_micros == 5_000_000 and not key.revoked
        assert await store.authenticate(secret) == key
        assert await store.authenticate(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
        assert await store.authenticate("") is None and await store.authenticate("sk-whatever") is None
        revoked = await store.revoke(key.id)
        assert revoked.revoked and await store.authenticate(secret) is None
        assert (await store.revoke(key.id)).revoked_at == revoked.revoked_at  # the first time stays
        with pytest.raises(state.KeyNotFound):
            await store.revoke("key_missing")
        listed = await store.list_keys()
        assert [k.id for k in listed] == [key.id] and listed[0].revoked
    run(backend, work)


def test_topup_and_ledger_sum_equals_balance(backend: Backend) -> None:
    async def work(store: Store) -> None:
        key, _ = await store.create_key("metered", 1_250_000)
        await store.topup(key.id, 750_000, "invoice 7")
        await asyncio.gather(*(store.topup(key.id, 1) for _ in range(20)))  # concurrent: none lost
        entries = await store.ledger(key.id)
        assert [e.kind for e in entries] == ["topup"] * 22
        assert entries[1].reference == "invoice 7"
        assert await store.balance(key.id) == sum(e.amount_micros for e in entries) == 2_000_020
        total = await store.runner.read(  # the invariant, as the database itself sums it
            lambda conn: conn.execute(sa.select(sa.func.sum(schema.ledger.c.amount_micros))
                                      .where(schema.ledger.c.key_id == key.id)).scalar())
        assert total == 2_000_020
        with pytest.raises(state.StateError):
            await store.topup(key.id, 0)
        unlimited, _ = await store.create_key("free")
        assert unlimited.balance_micros is None and await store.ledger(unlimited.id) == []
        with pytest.raises(state.StateError, match="unlimited"):
            await store.topup(unlimited.id, 5)
        assert await store.ledger(unlimited.id) == []  # a refused topup leaves no row behind
        with pytest.raises(state.KeyNotFound):
            await store.topup("key_missing", 5)
    run(backend, work)


def test_secret_is_stored_only_hashed(backend: Backend) -> None:
    async def work(store: Store) -> tuple[str, list[str]]:
        _, secret = await store.create_key("hidden", 1_000_000, ["a", "b"])
        def rows(conn: Connection) -> list[str]:
            return [repr(tuple(row)) for table in schema.metadata.sorted_tables
                    for row in conn.execute(sa.select(table))]
        return secret, await store.runner.read(rows)

    secret, dump = run(backend, work)
    assert dump and not any(secret in row or secret[8:] in row for row in dump)
    assert any(state.keygen.hash_secret(secret) in row for row in dump)


def test_money_is_exact() -> None:
    assert state.usd_to_micros("12.50") == 12_500_000
    assert state.usd_to_micros(0.1) == 100_000 and state.usd_to_micros("0.000001") == 1
    for bad in ("0.0000001", "-1", "abc", "NaN"):
        with pytest.raises(ValueError):
            state.usd_to_micros(bad)
    with pytest.raises(ValueError):
        state.usd_to_micros("0", allow_zero=False)
    assert state.format_usd(12_500_000) == "12.50" and state.format_usd(1) == "0.000001"
    assert state.format_usd(None) == "unlimited"
