"""An async task whose routes are all at capacity waits for room instead of failing, where a
synchronous request gets 429 queue_full at once; and the wait still ends at the deadline."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import StartGateway, base_config
from tests.fakes.openai_upstream import FakeOpenAI
from tests.state.tasks_support import ADMIN, accepted, make_key, poll, submit, usage, wait_for


def _one_at_a_time(tmp_path: Path, fake: FakeOpenAI, timeout_s: float) -> dict[str, Any]:
    cfg = base_config(tmp_path, fake.base_url)
    cfg["auth"] = {"enabled": True, "admin_key": ADMIN}
    cfg["server"]["request_timeout_s"] = timeout_s
    cfg["providers"]["up"].update(max_concurrency=1, max_queue=0)  # one call at a time, nobody waits
    return cfg


def test_a_task_waits_for_capacity_where_a_sync_request_is_refused(
        tmp_path: Path, fake_openai: FakeOpenAI, start_gateway: StartGateway) -> None:
    gw = start_gateway(_one_at_a_time(tmp_path, fake_openai, timeout_s=30))
    key = make_key(gw.http, "1")
    fake_openai.behave(delay_s=1.5)
    busy = threading.Thread(target=lambda: gw.http.post(
        "/v1/images/generations", json={"model": "remote", "prompt": "first", "size": "256x256"},
        headers={"authorization": f"Bearer {key}"}))
    busy.start()
    wait_for(lambda: len(fake_openai.requests) == 1, "the first request to occupy the upstream")
    refused = gw.http.post("/v1/images/generations", json={"model": "remote", "prompt": "x", "size": "256x256"},
                           headers={"authorization": f"Bearer {key}"})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full", refused.text
    task = accepted(submit(gw.http, key, model="remote", size="256x256", prompt="second"))
    done = poll(gw.http, key, task["id"])
    busy.join(30)
    assert done["status"] == "succeeded", done
    assert [(r.json or {}).get("prompt") for r in fake_openai.requests] == ["first", "second"]
    seen = usage(gw.http, key)
    assert seen["balance_micros"] == 1_000_000 - 2 * 1_311  # 256x256 × 0.02 USD/MP, twice; the 429 paid nothing


def _post_quietly(url: str, key: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        client.post("/v1/images/generations", json={"model": "remote", "prompt": "hog", "size": "256x256"},
                    headers={"authorization": f"Bearer {key}"})


def test_a_task_that_never_gets_room_fails_at_the_deadline_and_refunds(
        tmp_path: Path, fake_openai: FakeOpenAI, start_gateway: StartGateway) -> None:
    gw = start_gateway(_one_at_a_time(tmp_path, fake_openai, timeout_s=3))
    key = make_key(gw.http, "1")
    fake_openai.behave(delay_s=10)  # longer than the deadline: the upstream never frees up in time
    hog = threading.Thread(target=_post_quietly, args=(gw.url, key))  # ends at its own 3 s deadline
    hog.start()
    wait_for(lambda: len(fake_openai.requests) == 1, "the first request to occupy the upstream")
    task = accepted(submit(gw.http, key, model="remote", size="256x256"))
    done = poll(gw.http, key, task["id"], timeout=30)
    hog.join(30)
    assert done["status"] == "failed" and done["error"]["code"] in {"queue_full", "deadline_exceeded"}, done
    assert done["billing"]["charged"] == 0 and done["billing"]["refunded"] == done["billing"]["held"] > 0
    assert len(fake_openai.requests) == 1  # the task never reached the upstream
