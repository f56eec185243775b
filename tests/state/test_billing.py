"""Credit holds: the store's arithmetic (SQLite and, when reachable, PostgreSQL) and a live gateway."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from imagegate.router import state
from imagegate.router.state import schema
from imagegate.router.state.store import Store
from tests.conftest import StartGateway, base_config, serve_gateway
from tests.fakes.openai_upstream import FakeOpenAI
from tests.state.conftest import Backend, pg_database
from tests.state.test_store import run

ADMIN = "admin-secret-for-tests"


async def _sum(store: Store, key_id: str) -> int:
    return int(await store.runner.read(
        lambda conn: conn.execute(sa.select(sa.func.coalesce(sa.func.sum(schema.ledger.c.amount_micros), 0))
                                  .where(schema.ledger.c.key_id == key_id)).scalar_one()))


def test_hold_settle_release_arithmetic(backend: Backend) -> None:
    async def work(store: Store) -> None:
        key, _ = await store.create_key("metered", 10_000)
        first = await store.hold(key.id, 3_000, "req_1")
        assert await store.balance(key.id) == 7_000 == await _sum(store, key.id)
        assert await store.settle(first, 1_000) is True
        assert await store.balance(key.id) == 9_000 == await _sum(store, key.id)
        assert await store.settle(first, 3_000) is False  # idempotent: nothing moves again
        assert await store.release(first) is False
        assert await store.balance(key.id) == 9_000
        second = await store.hold(key.id, 9_000)
        assert await store.balance(key.id) == 0
        with pytest.raises(state.InsufficientCredit):
            await store.hold(key.id, 1)
        assert await store.release(second) is True
        assert await store.balance(key.id) == 9_000 == await _sum(store, key.id)
        kinds = [(e.kind, e.amount_micros) for e in await store.ledger(key.id)]
        assert kinds == [("topup", 10_000), ("hold", -3_000), ("capture", 0), ("release", 2_000),
                         ("hold", -9_000), ("release", 9_000)]
        recent = await store.recent_ledger(key.id, 2)
        assert [e.kind for e in recent] == ["release", "hold"]
        with pytest.raises(state.InsufficientCredit):
            await store.hold(key.id, 9_001)
        assert await store.balance(key.id) == 9_000 and await store.held(key.id) == []
    run(backend, work)


def test_concurrent_holds_never_overdraw(backend: Backend) -> None:
    async def work(store: Store) -> None:
        key, _ = await store.create_key("metered", 1_000)

        async def attempt() -> str | None:
            try:
                return await store.hold(key.id, 600)
            except state.InsufficientCredit:
                return None
        got = [h for h in await asyncio.gather(*(attempt() for _ in range(30))) if h]
        assert len(got) == 1
        assert await store.balance(key.id) == 400 == await _sum(store, key.id)
    run(backend, work)


def test_stale_holds_released_on_start(backend: Backend) -> None:
    async def place(store: Store) -> tuple[str, str, str]:
        key, _ = await store.create_key("metered", 5_000)
        old, fresh = await store.hold(key.id, 2_000), await store.hold(key.id, 1_000)
        await store.runner.write(  # as if placed by a gateway that crashed an hour ago
            lambda conn: conn.execute(schema.holds.update().where(schema.holds.c.id == old)
                                      .values(created_at=time.time() - 3600)))
        return key.id, old, fresh
    key_id, _old, fresh = run(backend, place)

    async def restart(store: Store) -> None:
        assert await store.release_stale_holds(600) == 1
        assert await store.held(key_id) == [fresh]  # a recent hold may belong to a live replica
        assert await store.balance(key_id) == 4_000 == await _sum(store, key_id)
        assert await store.release_stale_holds(600) == 0
    run(backend, restart)


# -- through a live gateway ----------------------------------------------------------------------

@pytest.fixture
def gw(tmp_path: Path, fake_openai: FakeOpenAI, start_gateway: StartGateway) -> Any:
    cfg = base_config(tmp_path, fake_openai.base_url)
    cfg["auth"] = {"enabled": True, "admin_key": ADMIN}
    return start_gateway(cfg)


def make_key(gw: Any, credits: str | None) -> str:
    fields = {"name": "t", **({"credits": credits} if credits is not None else {})}
    made = gw.http.post("/admin/keys", json=fields, headers={"authorization": f"Bearer {ADMIN}"})
    assert made.status_code == 201, made.text
    return str(made.json()["key"])


def post(gw: Any, key: str, **body: Any) -> httpx.Response:
    return gw.http.post("/v1/images/generations", json={"prompt": "a red cube", **body},
                        headers={"authorization": f"Bearer {key}"})


def usage(gw: Any, key: str) -> dict[str, Any]:
    answer = gw.http.get("/v1/usage", headers={"authorization": f"Bearer {key}"})
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def test_success_charges_exactly_the_megapixels(gw: Any) -> None:
    key = make_key(gw, "0.01")  # 10_000 micros
    answer = post(gw, key, model="demo", size="800x800", n=2)
    assert answer.status_code == 200, answer.text
    # 800 × 800 × 2 = 1.28 MP × 0.0015 USD = 0.00192 USD = 1_920 micros, exactly.
    bill = answer.json()["billing"]
    assert (bill["cost"], bill["held"], bill["charged"], bill["refunded"]) == (0.00192, 0.00192, 0.00192, 0.0)
    seen = usage(gw, key)
    assert seen["balance_micros"] == 10_000 - 1_920
    assert [(e["kind"], e["amount_micros"]) for e in seen["ledger"]] == [
        ("capture", 0), ("hold", -1_920), ("topup", 10_000)]
    assert sum(e["amount_micros"] for e in seen["ledger"]) == seen["balance_micros"]


def test_upstream_failure_refunds_in_full(gw: Any, fake_openai: FakeOpenAI) -> None:
    key = make_key(gw, "1.00")
    fake_openai.behave(fail_status=500)
    answer = post(gw, key, model="remote", size="512x512")
    assert answer.status_code >= 500
    seen = usage(gw, key)
    assert seen["balance_micros"] == 1_000_000
    # 512 × 512 = 0.262144 MP × 0.02 USD = 5_242.88 → 5_243 micros held, then all of it back.
    assert [(e["kind"], e["amount_micros"]) for e in seen["ledger"]] == [
        ("release", 5_243), ("hold", -5_243), ("topup", 1_000_000)]


def test_short_balance_is_402_and_nothing_routed(gw: Any, fake_openai: FakeOpenAI) -> None:
    key = make_key(gw, "0.005")
    answer = post(gw, key, model="remote", size="1024x1024")  # 20_972 micros > 5_000
    assert answer.status_code == 402, answer.text
    error = answer.json()["error"]
    assert error["type"] == "insufficient_quota" and error["code"] == "insufficient_quota"
    assert fake_openai.requests == []
    assert usage(gw, key)["balance_micros"] == 5_000


def test_unlimited_key_holds_nothing_and_usage_is_own(gw: Any) -> None:
    unlimited, other = make_key(gw, None), make_key(gw, "0.01")
    answer = post(gw, unlimited, model="demo", size="64x64")
    assert answer.status_code == 200 and "held" not in answer.json()["billing"]
    seen = usage(gw, unlimited)
    assert seen["balance_micros"] is None and seen["ledger"] == []
    assert [e["kind"] for e in usage(gw, other)["ledger"]] == ["topup"]
    assert gw.http.get("/v1/usage").status_code == 401


def test_usage_with_auth_off_is_404(tmp_path: Path, start_gateway: StartGateway) -> None:
    gw = start_gateway(base_config(tmp_path))
    answer = gw.http.get("/v1/usage")
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "usage_unavailable"


def _never_below_zero(ledger: list[dict[str, Any]]) -> None:
    running = 0
    for entry in reversed(ledger):  # oldest first: the balance after each posting
        running += entry["amount_micros"]
        assert running >= 0, ledger


def test_concurrent_requests_cannot_overdraw(gw: Any) -> None:
    """200 concurrent requests that each cost more than half the balance: exactly one succeeds."""
    key = make_key(gw, "0.003")  # 3_000 micros; each request holds 1_920: only one fits
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda _: post(gw, key, model="demo", size="800x800", n=2), range(200)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses.count(200) == 1 and statuses.count(402) == 199, statuses
    seen = usage(gw, key)
    assert seen["balance_micros"] == 3_000 - 1_920
    assert sum(e["amount_micros"] for e in seen["ledger"]) == seen["balance_micros"]
    _never_below_zero(seen["ledger"])


def test_concurrent_requests_cannot_overdraw_on_postgresql(tmp_path: Path, start_gateway: StartGateway) -> None:
    """The same race with the gateway's store on PostgreSQL (a database of this test's own)."""
    with pg_database() as url:
        cfg = base_config(tmp_path)
        cfg["auth"] = {"enabled": True, "admin_key": ADMIN}
        cfg["state"] = {"url": url}
        gw = start_gateway(cfg)
        test_concurrent_requests_cannot_overdraw(gw)
        gw.close()


@contextmanager
def replicas(tmp_path: Path, state_url: str, count: int = 2, upstream_url: str | None = None) -> Iterator[list[Any]]:
    """`count` gateways (auth on, each with its own artifacts dir) sharing one state store."""
    gateways: list[Any] = []
    try:
        for i in range(count):
            cfg = base_config(tmp_path / f"replica{i}", upstream_url)
            cfg["auth"] = {"enabled": True, "admin_key": ADMIN, "signing_secret": "shared-signing-secret"}
            cfg["state"] = {"url": state_url}
            gateways.append(serve_gateway(cfg))
        yield gateways
    finally:
        for gateway in gateways:
            gateway.close()


def test_two_replicas_on_one_postgresql_never_overdraw(tmp_path: Path) -> None:
    """Concurrent requests on one key spread over two replicas: exactly the affordable ones succeed,
    the balance never goes below zero and the ledger sums to it exactly."""
    with pg_database() as url, replicas(tmp_path, url) as (one, two):
        key = make_key(one, "0.01")  # 10_000 micros; 1_920 a request: five fit, 400 micros stay
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda i: post((one, two)[i % 2], key, model="demo", size="800x800", n=2),
                                    range(100)))
        statuses = sorted(a.status_code for a in answers)
        assert statuses.count(200) == 5 and statuses.count(402) == 95, statuses
        for gateway in (one, two):
            seen = usage(gateway, key)
            assert seen["balance_micros"] == 10_000 - 5 * 1_920
            assert sum(e["amount_micros"] for e in seen["ledger"]) == seen["balance_micros"]
            assert sorted(e["kind"] for e in seen["ledger"]) == ["capture"] * 5 + ["hold"] * 5 + ["topup"]
            _never_below_zero(seen["ledger"])
