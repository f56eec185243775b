"""Async tasks (`"async": true` / `Prefer: respond-async`): 202 + a task polled to its end, billing
held then captured or refunded, cancel, tenancy, expiry with the artifacts, metrics — and a gateway
SIGKILLed mid-task, whose task a restarted gateway (or a second replica on PostgreSQL) fails as
`task_abandoned` and refunds."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.conftest import UPSTREAM_KEY, Gateway, StartGateway, base_config, decode, png_bytes
from tests.fakes.openai_upstream import FakeOpenAI
from tests.state.conftest import pg_database
from tests.state.tasks_support import (
    ADMIN,
    ServeProcess,
    accepted,
    bearer,
    get_task,
    held_holds,
    make_key,
    metric,
    poll,
    submit,
    usage,
    wait_for,
)

LEASE_S = 1.5
# remote, 512x512, n=1: 0.262144 MP × 0.02 USD = 5_242.88 → 5_243 micros (as tests/state/test_billing.py).
REMOTE_HOLD = 0.005243


def auth_config(tmp_path: Path, upstream_url: str, state_url: str | None = None) -> dict[str, Any]:
    cfg = base_config(tmp_path, upstream_url)
    cfg["auth"] = {"enabled": True, "admin_key": ADMIN}
    cfg["state"] = {"url": state_url or f"sqlite:///{tmp_path / 'state.db'}", "lease_s": LEASE_S}
    return cfg


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
        return
    with pg_database() as url:
        yield url


@pytest.fixture
def pg_url() -> Iterator[str]:
    with pg_database() as url:
        yield url


@pytest.fixture
def gw(tmp_path: Path, fake_openai: FakeOpenAI, start_gateway: StartGateway) -> Gateway:
    """An in-thread gateway with auth on, state on SQLite."""
    return start_gateway(auth_config(tmp_path, fake_openai.base_url))


@pytest.fixture
def gw_on(tmp_path: Path, fake_openai: FakeOpenAI, state_url: str, start_gateway: StartGateway) -> Gateway:
    """The same on SQLite and (when reachable) on a PostgreSQL DATABASE of the test's own."""
    return start_gateway(auth_config(tmp_path, fake_openai.base_url, state_url))


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    started: list[ServeProcess] = []

    def start(cfg: dict[str, Any], name: str) -> ServeProcess:
        started.append(ServeProcess(tmp_path, cfg, name))
        return started[-1]

    yield start
    for proc in started:
        proc.stop()


def cancel(http: httpx.Client, key: str, task_id: str) -> httpx.Response:
    return http.post(f"/v1/tasks/{task_id}/cancel", headers=bearer(key))


def error_code(answer: httpx.Response, status: int) -> str:
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return str(error["code"])


def billing_of(task: dict[str, Any]) -> tuple[float, float, float]:
    bill = task["billing"]
    return bill["held"], bill["charged"], bill["refunded"]


def content(http: httpx.Client, key: str, artifact_id: str) -> httpx.Response:
    return http.get(f"/v1/artifacts/{artifact_id}/content", headers=bearer(key))


# -- success ---------------------------------------------------------------------------------------

def test_async_generation_succeeds_and_charges_exactly(gw_on: Gateway) -> None:
    key = make_key(gw_on.http, "0.01")  # 10_000 micros
    task = accepted(submit(gw_on.http, key, model="demo", size="400x400", n=2, seed=7))
    assert (task["model"], task["operation"]) == ("demo", "generate")
    done = poll(gw_on.http, key, task["id"])
    assert done["status"] == "succeeded" and done["error"] is None, done
    assert done["progress"] == 1.0
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]
    data = done["result"]["data"]
    assert [item["seed"] for item in data] == [7, 8]
    for item in data:
        assert item["artifact_id"].startswith("art_")
        assert decode(item["b64_json"]).size == (400, 400)
        stored = content(gw_on.http, key, item["artifact_id"])
        assert stored.status_code == 200 and stored.content == base64.b64decode(item["b64_json"])
    # 400 × 400 × 2 = 0.32 MP × 0.0015 USD = 0.00048 USD = 480 micros, exactly.
    bill = done["billing"]
    assert (bill["megapixels"], bill["price_per_mp"], bill["cost"]) == (0.32, 0.0015, 0.00048)
    assert billing_of(done) == (0.00048, 0.00048, 0.0)
    seen = usage(gw_on.http, key)
    assert seen["balance_micros"] == 10_000 - 480
    assert ("hold", -480) in [(e["kind"], e["amount_micros"]) for e in seen["ledger"]]


def test_url_result_is_a_signed_link_to_the_same_artifact(gw: Gateway) -> None:
    key = make_key(gw.http, None)
    done = poll(gw.http, key, accepted(submit(gw.http, key, model="demo", size="64x64",
                                               response_format="url"))["id"])
    assert done["status"] == "succeeded", done
    [item] = done["result"]["data"]
    assert "b64_json" not in item or item["b64_json"] is None
    assert "signature=" in item["url"] and item["artifact_id"] in item["url"]
    signed = httpx.get(httpx.URL(gw.url).join(item["url"]), timeout=30)  # no key: the signature is the pass
    owned = content(gw.http, key, item["artifact_id"])
    assert signed.status_code == 200 and owned.status_code == 200
    assert signed.content == owned.content
    assert decode(base64.b64encode(signed.content).decode()).size == (64, 64)
    assert billing_of(done) == (0, 0, 0)  # an unlimited key holds nothing


def test_prefer_header_makes_a_json_generation_async(gw: Gateway) -> None:
    key = make_key(gw.http, None)
    task = accepted(submit(gw.http, key, prefer=True, model="demo", size="64x64"))
    done = poll(gw.http, key, task["id"])
    assert done["status"] == "succeeded" and len(done["result"]["data"]) == 1


def test_prefer_header_makes_a_multipart_edit_async(gw: Gateway) -> None:
    key = make_key(gw.http, None)
    client = OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=30)
    raw = client.images.with_raw_response.edit(
        model="demo", image=("in.png", png_bytes(64, 64), "image/png"), prompt="make it blue",
        size="64x64", extra_headers={"Prefer": "respond-async"})  # type: ignore[arg-type]
    task = accepted(raw.http_response)
    assert task["operation"] == "edit"
    done = poll(gw.http, key, task["id"])
    assert done["status"] == "succeeded", done
    assert decode(done["result"]["data"][0]["b64_json"]).size == (64, 64)


def test_progress_of_a_multi_image_task_ends_at_one(gw: Gateway) -> None:
    key = make_key(gw.http, None)
    seen: list[dict[str, Any]] = []
    done = poll(gw.http, key, accepted(submit(gw.http, key, model="demo", size="256x256", n=4))["id"], seen=seen)
    progress = [t["progress"] for t in seen]
    assert all(isinstance(p, float) and 0.0 <= p <= 1.0 for p in progress), progress
    assert progress == sorted(progress), progress  # never goes backwards
    assert done["status"] == "succeeded" and done["progress"] == 1.0
    assert len({item["artifact_id"] for item in done["result"]["data"]}) == 4


# -- refused before any task exists ----------------------------------------------------------------

@pytest.mark.parametrize("bad", [{"size": "100x100"}, {"bogus_field": 1}, {"n": 9}],
                         ids=["bad-size", "unknown-field", "too-many"])
def test_bad_async_input_is_the_sync_400_and_makes_no_task(gw: Gateway, bad: dict[str, Any]) -> None:
    key = make_key(gw.http, "0.01")
    body = {"prompt": "a red cube", "model": "demo", "size": "64x64", **bad}
    sync = gw.http.post("/v1/images/generations", json=body, headers=bearer(key))
    as_task = gw.http.post("/v1/images/generations", json={**body, "async": True}, headers=bearer(key))
    preferred = gw.http.post("/v1/images/generations", json=body,
                             headers={**bearer(key), "prefer": "respond-async"})
    assert sync.status_code == 400, sync.text
    assert (as_task.status_code, as_task.json()) == (400, sync.json())
    assert (preferred.status_code, preferred.json()) == (400, sync.json())
    assert "location" not in as_task.headers
    seen = usage(gw.http, key)
    assert seen["balance_micros"] == 10_000 and [e["kind"] for e in seen["ledger"]] == ["topup"]
    assert metric(gw.http.get("/metrics").text, "imagegate_tasks_total", status="submitted") == 0


def test_short_balance_is_402_and_makes_no_task(gw: Gateway, fake_openai: FakeOpenAI) -> None:
    key = make_key(gw.http, "0.005")
    answer = submit(gw.http, key, model="remote", size="1024x1024")  # 20_972 micros > 5_000
    assert error_code(answer, 402) == "insufficient_quota"
    assert "location" not in answer.headers
    assert fake_openai.requests == []
    assert usage(gw.http, key)["balance_micros"] == 5_000
    assert metric(gw.http.get("/metrics").text, "imagegate_tasks_total", status="submitted") == 0


# -- cancel and failure ----------------------------------------------------------------------------

def test_cancel_running_task_refunds_and_the_late_result_changes_nothing(
        gw_on: Gateway, fake_openai: FakeOpenAI, state_url: str) -> None:
    key = make_key(gw_on.http, "1.00")
    delay = 2.5
    fake_openai.behave(delay_s=delay)
    task = accepted(submit(gw_on.http, key, model="remote", size="512x512"))
    wait_for(lambda: bool(fake_openai.requests), "the task to reach the upstream")
    reached = time.monotonic()
    assert usage(gw_on.http, key)["balance_micros"] == 1_000_000 - 5_243  # held while it runs
    answer = cancel(gw_on.http, key, task["id"])
    assert answer.status_code == 200, answer.text
    canceled = answer.json()
    assert canceled["id"] == task["id"] and canceled["status"] == "canceled"
    assert billing_of(canceled) == (REMOTE_HOLD, 0, REMOTE_HOLD)
    assert canceled["result"] is None and canceled["finished_at"] is not None
    assert usage(gw_on.http, key)["balance_micros"] == 1_000_000
    # The upstream's answer comes once its delay is over: the task must stay canceled, nothing charged.
    while time.monotonic() < reached + delay + 1.5:
        now = get_task(gw_on.http, key, task["id"]).json()
        assert now["status"] == "canceled" and billing_of(now) == (REMOTE_HOLD, 0, REMOTE_HOLD), now
        time.sleep(0.2)
    seen = usage(gw_on.http, key)
    assert seen["balance_micros"] == 1_000_000
    assert [e["kind"] for e in seen["ledger"] if e["kind"] == "capture" and e["amount_micros"]] == []
    assert held_holds(state_url) == 0


def test_cancel_of_a_finished_task_is_409(gw: Gateway) -> None:
    key = make_key(gw.http, "0.01")
    done = poll(gw.http, key, accepted(submit(gw.http, key, model="demo", size="400x400"))["id"])
    assert done["status"] == "succeeded", done
    assert error_code(cancel(gw.http, key, done["id"]), 409) == "task_not_cancelable"
    after = get_task(gw.http, key, done["id"]).json()
    assert after["status"] == "succeeded" and billing_of(after) == (0.00024, 0.00024, 0.0)
    assert usage(gw.http, key)["balance_micros"] == 10_000 - 240


def test_upstream_failure_fails_the_task_with_the_sync_code_and_refunds(gw: Gateway, fake_openai: FakeOpenAI,
                                                                       tmp_path: Path) -> None:
    key = make_key(gw.http, "1.00")
    fake_openai.behave(fail_status=500)
    sync_code = error_code(gw.http.post("/v1/images/generations", headers=bearer(key),
                                        json={"prompt": "p", "model": "remote", "size": "512x512"}), 502)
    task = accepted(submit(gw.http, key, model="remote", size="512x512"))
    done = poll(gw.http, key, task["id"])
    assert done["status"] == "failed" and done["result"] is None, done
    assert set(done["error"]) == {"message", "type", "param", "code"}
    assert done["error"]["code"] == sync_code == "upstream_error"
    assert billing_of(done) == (REMOTE_HOLD, 0, REMOTE_HOLD)
    assert UPSTREAM_KEY not in get_task(gw.http, key, task["id"]).text
    seen = usage(gw.http, key)
    assert seen["balance_micros"] == 1_000_000
    assert held_holds(f"sqlite:///{tmp_path / 'state.db'}") == 0


# -- tenancy and expiry ----------------------------------------------------------------------------

def test_another_key_cannot_see_cancel_or_download_a_task(gw: Gateway) -> None:
    mine, theirs = make_key(gw.http, None), make_key(gw.http, None)
    done = poll(gw.http, mine, accepted(submit(gw.http, mine, model="demo", size="64x64"))["id"])
    assert done["status"] == "succeeded", done
    assert error_code(get_task(gw.http, theirs, done["id"]), 404) == "task_not_found"
    assert error_code(cancel(gw.http, theirs, done["id"]), 404) == "task_not_found"  # not a 409: no leak
    assert error_code(get_task(gw.http, mine, "task_doesnotexist0000"), 404) == "task_not_found"
    assert error_code(cancel(gw.http, mine, "task_doesnotexist0000"), 404) == "task_not_found"
    assert get_task(gw.http, None, done["id"]).status_code == 401
    artifact = done["result"]["data"][0]["artifact_id"]
    assert content(gw.http, mine, artifact).status_code == 200
    assert error_code(content(gw.http, theirs, artifact), 404) == "artifact_not_found"


def test_tasks_expire_with_their_artifacts(tmp_path: Path, fake_openai: FakeOpenAI,
                                           start_gateway: StartGateway) -> None:
    cfg = auth_config(tmp_path, fake_openai.base_url)
    cfg["artifacts"]["ttl_hours"] = 0.001  # 3.6 s
    gw = start_gateway(cfg)
    key = make_key(gw.http, None)
    done = poll(gw.http, key, accepted(submit(gw.http, key, model="demo", size="64x64"))["id"], timeout=3)
    assert done["status"] == "succeeded", done
    assert done["expires_at"] - done["created_at"] <= 5
    artifact = done["result"]["data"][0]["artifact_id"]
    wait_for(lambda: get_task(gw.http, key, done["id"]).status_code == 404, "the task to expire")
    assert error_code(get_task(gw.http, key, done["id"]), 404) == "task_not_found"
    assert error_code(content(gw.http, key, artifact), 404) == "artifact_not_found"


# -- metrics ---------------------------------------------------------------------------------------

def test_metrics_count_tasks_by_status(tmp_path: Path, fake_openai: FakeOpenAI, start_gateway: StartGateway) -> None:
    gw = start_gateway(base_config(tmp_path, fake_openai.base_url))  # auth off
    ok = poll(gw.http, None, accepted(submit(gw.http, None, model="demo", size="64x64"))["id"])
    fake_openai.behave(fail_status=500)
    bad = poll(gw.http, None, accepted(submit(gw.http, None, model="remote", size="256x256"))["id"])
    assert (ok["status"], bad["status"]) == ("succeeded", "failed")
    assert billing_of(ok) == (0, 0, 0)  # auth off: nothing held
    text = gw.http.get("/metrics").text
    assert metric(text, "imagegate_tasks_total", status="succeeded") == 1, text
    assert metric(text, "imagegate_tasks_total", status="failed") == 1
    assert metric(text, "imagegate_tasks_total", status="submitted") == 2
    assert metric(text, "imagegate_tasks_total", status="canceled") == 0


# -- a gateway killed mid-task ---------------------------------------------------------------------

def _start_slow_task(proc: ServeProcess, fake_openai: FakeOpenAI) -> tuple[str, str]:
    """A metered key and its async task, now waiting on the (slow) upstream."""
    key = make_key(proc.http, "1.00")
    fake_openai.behave(delay_s=8)
    task = accepted(submit(proc.http, key, model="remote", size="512x512"))
    wait_for(lambda: bool(fake_openai.requests), "the task to reach the upstream")
    assert usage(proc.http, key)["balance_micros"] == 1_000_000 - 5_243
    return key, task["id"]


def _assert_abandoned_and_refunded(proc: ServeProcess, key: str, task_id: str, url: str) -> None:
    done = poll(proc.http, key, task_id, timeout=30)
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "task_abandoned", done
    assert billing_of(done) == (REMOTE_HOLD, 0, REMOTE_HOLD)
    assert usage(proc.http, key)["balance_micros"] == 1_000_000  # usage() also checks the ledger sums to it
    assert held_holds(url) == 0


def test_restarted_gateway_fails_and_refunds_the_killed_task(tmp_path: Path, fake_openai: FakeOpenAI,
                                                             state_url: str, serve: Any) -> None:
    cfg = auth_config(tmp_path, fake_openai.base_url, state_url)
    first = serve(cfg, "first")
    key, task_id = _start_slow_task(first, fake_openai)
    first.kill()
    fake_openai.behave()
    second = serve(cfg, "second")
    _assert_abandoned_and_refunded(second, key, task_id, state_url)
    assert len(fake_openai.requests) == 1  # an abandoned task is failed, not run again
    # The restarted gateway serves new tasks as usual.
    fresh = poll(second.http, key, accepted(submit(second.http, key, model="demo", size="64x64"))["id"])
    assert fresh["status"] == "succeeded", fresh


def test_second_replica_fails_and_refunds_the_task_of_a_killed_one(tmp_path: Path, fake_openai: FakeOpenAI,
                                                                   pg_url: str, serve: Any) -> None:
    cfg = auth_config(tmp_path, fake_openai.base_url, pg_url)
    a, b = serve(cfg, "replica-a"), serve(cfg, "replica-b")
    key, task_id = _start_slow_task(a, fake_openai)
    running = get_task(b.http, key, task_id)  # the task is shared through the store
    assert running.status_code == 200 and running.json()["status"] in ("queued", "running"), running.text
    a.kill()
    fake_openai.behave()
    _assert_abandoned_and_refunded(b, key, task_id, pg_url)
    answer = b.http.post("/v1/images/generations", headers=bearer(key),
                         json={"prompt": "p", "model": "demo", "size": "64x64"})
    assert answer.status_code == 200, answer.text
    fresh = poll(b.http, key, accepted(submit(b.http, key, model="demo", size="64x64"))["id"])
    assert fresh["status"] == "succeeded", fresh
