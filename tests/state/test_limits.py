"""Per-key limits (admin API fields `rpm` and `concurrency`) against live gateways, auth on.

The upstream is FakeOpenAI behind model `remote` (256×256 costs 1_311 micros): its `.requests`
shows whether a refused request reached it; `behave(delay_s=…)` keeps a request in flight.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import StartGateway, base_config, png_bytes
from tests.fakes.openai_upstream import FakeOpenAI
from tests.state.test_billing import ADMIN, pg_database, replicas, usage

BODY = {"model": "remote", "prompt": "a red cube", "size": "256x256"}
PRICE = 1_311


@pytest.fixture
def gw(tmp_path: Path, fake_openai: FakeOpenAI, start_gateway: StartGateway) -> Any:
    cfg = base_config(tmp_path, fake_openai.base_url)
    cfg["auth"] = {"enabled": True, "admin_key": ADMIN}
    return start_gateway(cfg)


def make_key(gw: Any, **limits: int) -> str:
    made = gw.http.post("/admin/keys", json={"name": "t", "credits": "1.00", **limits},
                        headers={"authorization": f"Bearer {ADMIN}"})
    assert made.status_code == 201, made.text
    assert all(made.json()[field] == value for field, value in limits.items()), made.json()
    return str(made.json()["key"])


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def generate(gw: Any, key: str, **body: Any) -> httpx.Response:
    return gw.http.post("/v1/images/generations", json={**BODY, **body}, headers=auth(key))


def upload(gw: Any, key: str) -> httpx.Response:
    return gw.http.post("/v1/uploads", files={"file": ("a.png", png_bytes(), "image/png")}, headers=auth(key))


def holds(gw: Any, key: str) -> int:
    return sum(e["kind"] == "hold" for e in usage(gw, key)["ledger"])


def assert_429(answer: httpx.Response, code: str) -> int:
    assert answer.status_code == 429, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    assert answer.headers["retry-after"].isdigit(), answer.headers
    if code == "concurrency_limit_exceeded":
        assert answer.headers["retry-after"] == "1"
    return int(answer.headers["retry-after"])


def at_minute_start(needed_s: float = 20) -> None:
    """The rpm window is the clock minute: start a test early enough in one that it cannot reset under it."""
    left = 60 - time.time() % 60
    if left < needed_s:
        time.sleep(left + 0.2)


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def in_background(call: Callable[[], httpx.Response]) -> tuple[threading.Thread, list[httpx.Response]]:
    out: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: out.append(call()))
    thread.start()
    return thread, out


# -- rpm ------------------------------------------------------------------------------------------

def test_rpm_over_the_minute_is_429_with_no_hold_and_no_upstream_call(gw: Any, fake_openai: FakeOpenAI) -> None:
    limited, other = make_key(gw, rpm=3), make_key(gw, rpm=3)
    at_minute_start()
    for _ in range(3):
        answer = generate(gw, limited)
        assert answer.status_code == 200, answer.text
    before = usage(gw, limited)
    started = time.time()
    retry_after = assert_429(generate(gw, limited), "rate_limit_exceeded")
    assert 1 <= retry_after <= min(60, math.ceil(60 - started % 60) + 1), (retry_after, started % 60)
    assert_429(upload(gw, limited), "rate_limit_exceeded")  # uploads are under the same limit
    assert len(fake_openai.requests) == 3
    after = usage(gw, limited)
    assert after["balance_micros"] == before["balance_micros"] == 1_000_000 - 3 * PRICE
    assert after["ledger"] == before["ledger"]  # no hold, no release: nothing posted at all
    answer = generate(gw, other)  # another key's minute is its own
    assert answer.status_code == 200, answer.text
    assert len(fake_openai.requests) == 4


def test_uploads_count_towards_rpm(gw: Any, fake_openai: FakeOpenAI) -> None:
    key = make_key(gw, rpm=2)
    at_minute_start()
    assert upload(gw, key).status_code == 200
    assert generate(gw, key).status_code == 200
    assert_429(generate(gw, key), "rate_limit_exceeded")
    assert len(fake_openai.requests) == 1 and holds(gw, key) == 1


# -- concurrency ----------------------------------------------------------------------------------

def test_concurrency_limit_refuses_the_second_request_in_flight(gw: Any, fake_openai: FakeOpenAI) -> None:
    key, other = make_key(gw, concurrency=1), make_key(gw, concurrency=1)
    fake_openai.behave(delay_s=1.5)
    thread, first = in_background(lambda: generate(gw, key))
    wait_for(lambda: len(fake_openai.requests) == 1, "the first request to reach the upstream")
    assert_429(generate(gw, key), "concurrency_limit_exceeded")
    other_thread, other_answer = in_background(lambda: generate(gw, other))  # its own slot
    thread.join(timeout=60)
    other_thread.join(timeout=60)
    assert first[0].status_code == 200, first[0].text
    assert other_answer[0].status_code == 200, other_answer[0].text
    assert len(fake_openai.requests) == 2
    assert holds(gw, key) == 1  # the refused request held nothing
    fake_openai.behave()
    answer = generate(gw, key)  # the slot is free again
    assert answer.status_code == 200, answer.text
    assert holds(gw, key) == 2


def _task(gw: Any, key: str, task_id: str) -> dict[str, Any]:
    answer = gw.http.get(f"/v1/tasks/{task_id}", headers=auth(key))
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def _eventually_served(gw: Any, key: str) -> None:
    """A task that ended frees its slot (allowing for the moment between its status and the release)."""
    deadline = time.monotonic() + 10
    while (answer := generate(gw, key, model="demo", size="64x64")).status_code == 429:
        assert answer.json()["error"]["code"] == "concurrency_limit_exceeded", answer.text
        assert time.monotonic() < deadline, "the finished task still holds the key's only slot"
        time.sleep(0.1)
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("end", ["succeeded", "failed", "canceled"])
def test_async_task_holds_the_slot_until_it_ends(gw: Any, fake_openai: FakeOpenAI, end: str) -> None:
    key = make_key(gw, concurrency=1)
    fake_openai.behave(delay_s=3, fail_status=500 if end == "failed" else None)
    submitted = generate(gw, key, **{"async": True})
    assert submitted.status_code == 202, submitted.text
    task_id = submitted.json()["id"]
    assert_429(generate(gw, key), "concurrency_limit_exceeded")
    assert_429(generate(gw, key, **{"async": True}), "concurrency_limit_exceeded")
    if end == "canceled":
        canceled = gw.http.post(f"/v1/tasks/{task_id}/cancel", headers=auth(key))
        assert canceled.status_code == 200 and canceled.json()["status"] == "canceled", canceled.text
    wait_for(lambda: _task(gw, key, task_id)["status"] not in ("queued", "running"), "the task to end")
    assert _task(gw, key, task_id)["status"] == end
    _eventually_served(gw, key)
    assert len(fake_openai.requests) <= 1  # the refused submissions never reached the upstream


# -- across replicas ------------------------------------------------------------------------------

def test_limits_are_shared_across_replicas_on_postgresql(tmp_path: Path, fake_openai: FakeOpenAI) -> None:
    with pg_database() as url, replicas(tmp_path, url, upstream_url=fake_openai.base_url) as (one, two):
        limited, single = make_key(one, rpm=2), make_key(one, concurrency=1)
        at_minute_start()
        assert generate(one, limited).status_code == 200
        assert generate(two, limited).status_code == 200
        assert_429(generate(one, limited), "rate_limit_exceeded")
        assert_429(generate(two, limited), "rate_limit_exceeded")
        fake_openai.behave(delay_s=1.5)
        thread, first = in_background(lambda: generate(one, single))
        wait_for(lambda: len(fake_openai.requests) == 3, "the slow request to reach the upstream")
        assert_429(generate(two, single), "concurrency_limit_exceeded")
        thread.join(timeout=60)
        assert first[0].status_code == 200, first[0].text
        fake_openai.behave()
        answer = generate(two, single)
        assert answer.status_code == 200, answer.text
        assert len(fake_openai.requests) == 4
