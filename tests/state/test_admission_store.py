"""A request's admission and settlement as the pipeline calls them (Store.admit, Store.settle_request),
on SQLite and PostgreSQL. On PostgreSQL a key without limits takes the single-statement path
(pg_credit.py) and a key with limits the transaction; both must keep the same books."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from imagegate.router import state
from imagegate.router.state import schema
from imagegate.router.state.runner import ThreadRunner
from imagegate.router.state.store import Store
from tests.state.conftest import Backend
from tests.state.test_billing import _sum
from tests.state.test_store import run


async def _admit(store: Store, key_id: str, micros: int, concurrency: int | None = None) -> state.records.AdmitOutcome:
    return await store.admit(key_id, rpm=None, concurrency=concurrency, slot_ttl_s=60.0, hold_micros=micros,
                             reference="req_1")


async def _kinds(store: Store, key_id: str) -> list[tuple[str, int, str | None]]:
    return [(e.kind, e.amount_micros, e.reference) for e in await store.ledger(key_id)]


def test_admit_and_settle_keep_the_books(backend: Backend) -> None:
    async def work(store: Store) -> None:
        key, _ = await store.create_key("metered", 10_000)
        first = await _admit(store, key.id, 3_000)
        assert first.refused is None and first.slot_id is None and first.hold_id is not None
        assert await store.balance(key.id) == 7_000 == await _sum(store, key.id)
        assert await store.held(key.id) == [first.hold_id]
        assert await store.settle_request(first.hold_id, 1_000, None) is True
        assert await store.settle_request(first.hold_id, 3_000, None) is False  # settled once only
        assert await store.balance(key.id) == 9_000 == await _sum(store, key.id)
        assert await _kinds(store, key.id) == [
            ("topup", 10_000, "initial credits"), ("hold", -3_000, first.hold_id),
            ("capture", 0, f"{first.hold_id} captured=1000"), ("release", 2_000, first.hold_id)]
        whole = await _admit(store, key.id, 4_000)
        assert whole.hold_id is not None
        assert await store.settle_request(whole.hold_id, 9_999, None) is True  # at most the hold
        failed = await _admit(store, key.id, 5_000)
        assert failed.hold_id is not None
        assert await store.settle_request(failed.hold_id, 0, None) is True  # a failure: all back
        assert (await _kinds(store, key.id))[4:] == [
            ("hold", -4_000, whole.hold_id), ("capture", 0, f"{whole.hold_id} captured=4000"),
            ("hold", -5_000, failed.hold_id), ("release", 5_000, failed.hold_id)]
        assert await store.balance(key.id) == 5_000 == await _sum(store, key.id)
        assert await store.held(key.id) == []
    run(backend, work)


def test_refused_admissions_take_nothing(backend: Backend) -> None:
    async def work(store: Store) -> None:
        key, _ = await store.create_key("metered", 1_000)
        assert (await _admit(store, key.id, 1_001)).refused == "credit"
        with pytest.raises(state.StateError, match="whole number"):
            await _admit(store, key.id, -1)
        with pytest.raises(state.KeyNotFound):
            await _admit(store, "key_missing", 1)
        unlimited, _ = await store.create_key("free")
        with pytest.raises(state.StateError, match="unlimited"):
            await _admit(store, unlimited.id, 1)
        with pytest.raises(state.StateError, match="not found"):
            await store.settle_request("hold_missing", 1, None)
        await store.revoke(key.id)
        assert (await _admit(store, key.id, 1)).refused == "revoked"
        assert await store.balance(key.id) == 1_000
        assert await _kinds(store, key.id) == [("topup", 1_000, "initial credits")]
        assert await store.held(key.id) == []
    run(backend, work)


def test_concurrent_admissions_never_overdraw(backend: Backend) -> None:
    async def work(store: Store) -> None:
        key, _ = await store.create_key("metered", 1_000)
        got = await asyncio.gather(*(_admit(store, key.id, 300) for _ in range(30)))
        holds = [g.hold_id for g in got if g.hold_id is not None]
        assert len(holds) == 3 and sorted(g.refused or "" for g in got) == [""] * 3 + ["credit"] * 27
        assert await store.balance(key.id) == 100 == await _sum(store, key.id)
        settled = await asyncio.gather(*(store.settle_request(h, 100, None) for h in holds + holds))
        assert sorted(settled) == [False] * 3 + [True] * 3  # each hold moves money once
        assert await store.balance(key.id) == 700 == await _sum(store, key.id)
    run(backend, work)


def test_settle_frees_the_concurrency_slot(backend: Backend) -> None:
    async def work(store: Store) -> None:
        key, _ = await store.create_key("metered", 10_000, concurrency=1)
        first = await _admit(store, key.id, 1_000, concurrency=1)
        assert first.slot_id is not None and first.hold_id is not None
        assert (await _admit(store, key.id, 1_000, concurrency=1)).refused == "concurrency"
        assert await store.settle_request(first.hold_id, 1_000, first.slot_id) is True
        again = await _admit(store, key.id, 1_000, concurrency=1)
        assert again.slot_id is not None and again.hold_id is not None
        assert await store.settle_request(None, 0, again.slot_id) is False  # a slot alone
        assert (await _admit(store, key.id, 1_000, concurrency=1)).slot_id is not None
        assert await store.balance(key.id) == 7_000 == await _sum(store, key.id)
    run(backend, work)


def test_transactions_are_all_or_nothing(backend: Backend) -> None:
    """The store's connections idle in autocommit on PostgreSQL; a transaction must still be one."""
    async def work(store: Store) -> None:
        key, _ = await store.create_key("metered", 1_000)
        def write_then_fail(conn: Connection) -> None:
            conn.execute(schema.api_keys.update().where(schema.api_keys.c.id == key.id).values(balance_micros=0))
            raise RuntimeError("after the write, before the commit")
        with pytest.raises(RuntimeError):
            await store.runner.write(write_then_fail)
        balance = await store.runner.read(lambda conn: conn.execute(
            sa.select(schema.api_keys.c.balance_micros).where(schema.api_keys.c.id == key.id)).scalar_one())
        assert balance == 1_000
    run(backend, work)


def test_on_sqlite_a_transaction_is_one_hand_over_to_one_worker_thread(tmp_path: Path) -> None:
    """runner.py: every statement of an admission (rate count, slot, hold) runs on the same worker
    thread, none on the event loop's, and the settle likewise: one hand-over each."""
    async def work() -> tuple[int, list[int], list[int]]:
        store = await state.open_store(f"sqlite:///{tmp_path}/state.db")
        try:
            key, _ = await store.create_key("limited", 10_000, rpm=100, concurrency=2)
            threads: list[int] = []
            assert isinstance(store.runner, ThreadRunner)
            engine = store.runner.engine
            sa.event.listen(engine, "before_cursor_execute", lambda *_: threads.append(threading.get_ident()))
            got = await store.admit(key.id, rpm=100, concurrency=2, slot_ttl_s=60.0, hold_micros=1_000,
                                    reference="req_1")
            admitted, threads[:] = list(threads), []
            assert await store.settle_request(got.hold_id, 400, got.slot_id) is True
            settled = list(threads)
            assert await store.balance(key.id) == 9_600
            return threading.get_ident(), admitted, settled
        finally:
            await store.close()
    loop_thread, admitted, settled = asyncio.run(work())
    assert len(admitted) >= 5 and len(set(admitted)) == 1 and loop_thread not in admitted
    assert len(settled) >= 3 and len(set(settled)) == 1 and loop_thread not in settled
