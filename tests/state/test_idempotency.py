"""`Idempotency-Key` on image POSTs and uploads, against live gateways (auth on, metered keys).

The upstream is FakeOpenAI behind model `remote`: its `.requests` counts the upstream calls.
256×256 on `remote` costs 65_536 px × 0.02 USD/MP = 1_310.72 → 1_311 micros held and charged.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import StartGateway, b64, base_config, png_bytes
from tests.fakes.openai_upstream import FakeOpenAI
from tests.state.test_billing import ADMIN, pg_database, replicas, usage

PRICE = 1_311  # micros for one 256×256 image on `remote`
BODY = {"model": "remote", "prompt": "a red cube", "size": "256x256", "seed": 7}
REPLAYED = "idempotency-replayed"


@pytest.fixture
def gw(tmp_path: Path, fake_openai: FakeOpenAI, start_gateway: StartGateway) -> Any:
    cfg = base_config(tmp_path, fake_openai.base_url)
    cfg["auth"] = {"enabled": True, "admin_key": ADMIN}
    return start_gateway(cfg)


def make_key(gw: Any, credits: str = "1.00") -> str:
    made = gw.http.post("/admin/keys", json={"name": "t", "credits": credits},
                        headers={"authorization": f"Bearer {ADMIN}"})
    assert made.status_code == 201, made.text
    return str(made.json()["key"])


def headers(key: str, idem: str | bytes | None) -> dict[str, Any]:
    return {"authorization": f"Bearer {key}", **({"idempotency-key": idem} if idem is not None else {})}


def generate(gw: Any, key: str, idem: str | bytes | None, **body: Any) -> httpx.Response:
    return gw.http.post("/v1/images/generations", json={**BODY, **body}, headers=headers(key, idem))


def holds(gw: Any, key: str) -> list[int]:
    return [e["amount_micros"] for e in usage(gw, key)["ledger"] if e["kind"] == "hold"]


def assert_error(answer: httpx.Response, status: int, code: str | None, param: str | None = None) -> None:
    assert answer.status_code == status, answer.text[:300]
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error


def assert_replay(first: httpx.Response, second: httpx.Response) -> None:
    assert first.status_code == second.status_code
    assert second.content == first.content  # byte-for-byte
    assert second.headers.get(REPLAYED) == "true"
    assert first.headers.get(REPLAYED) != "true"


def test_replay_is_byte_for_byte_with_one_upstream_call_and_one_charge(gw: Any, fake_openai: FakeOpenAI) -> None:
    key = make_key(gw)
    first = generate(gw, key, "gen-1")
    assert first.status_code == 200, first.text
    second = generate(gw, key, "gen-1")
    assert_replay(first, second)
    assert len(fake_openai.requests) == 1
    seen = usage(gw, key)
    assert seen["balance_micros"] == 1_000_000 - PRICE
    assert [(e["kind"], e["amount_micros"]) for e in seen["ledger"]] == [
        ("capture", 0), ("hold", -PRICE), ("topup", 1_000_000)]


def test_same_key_with_another_body_or_endpoint_is_409(gw: Any, fake_openai: FakeOpenAI) -> None:
    key = make_key(gw)
    assert generate(gw, key, "gen-2").status_code == 200
    balance = usage(gw, key)["balance_micros"]
    assert_error(generate(gw, key, "gen-2", prompt="a blue sphere"), 409, "idempotency_key_reused")
    assert_error(generate(gw, key, "gen-2", seed=8), 409, "idempotency_key_reused")
    edit = gw.http.post("/v1/images/edits", headers=headers(key, "gen-2"),
                        json={**BODY, "image": "data:image/png;base64," + b64(png_bytes(256, 256))})
    assert_error(edit, 409, "idempotency_key_reused")
    upload = gw.http.post("/v1/uploads", files={"file": ("a.png", png_bytes(), "image/png")},
                          headers=headers(key, "gen-2"))
    assert_error(upload, 409, "idempotency_key_reused")
    assert len(fake_openai.requests) == 1
    assert usage(gw, key)["balance_micros"] == balance and holds(gw, key) == [-PRICE]


def race(gateways: list[Any], key: str, idem: str) -> None:
    """The same request with one Idempotency-Key, sent at once through each gateway: both 200 with
    the same bytes, one of them replayed."""
    answers: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda gw=gw: answers.append(generate(gw, key, idem))) for gw in gateways]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert answers[0].content == answers[1].content
    assert [a.headers.get(REPLAYED) for a in answers].count("true") == 1


def test_concurrent_duplicates_call_upstream_once(gw: Any, fake_openai: FakeOpenAI) -> None:
    key = make_key(gw)
    fake_openai.behave(delay_s=1.0)
    race([gw, gw], key, "gen-race")
    assert len(fake_openai.requests) == 1
    assert usage(gw, key)["balance_micros"] == 1_000_000 - PRICE and holds(gw, key) == [-PRICE]


def test_a_failed_first_try_is_not_kept(gw: Any, fake_openai: FakeOpenAI) -> None:
    key = make_key(gw)
    fake_openai.behave(fail_status=500, fail_times=1)
    failed = generate(gw, key, "gen-retry")
    assert failed.status_code >= 500, failed.text
    retried = generate(gw, key, "gen-retry")
    assert retried.status_code == 200, retried.text
    assert retried.headers.get(REPLAYED) != "true"
    assert len(fake_openai.requests) == 2
    again = generate(gw, key, "gen-retry")  # now the success is kept
    assert_replay(retried, again)
    assert len(fake_openai.requests) == 2
    seen = usage(gw, key)
    assert seen["balance_micros"] == 1_000_000 - PRICE  # the failure was refunded, the success charged once
    assert sorted(e["kind"] for e in seen["ledger"]) == ["capture", "hold", "hold", "release", "topup"]


def test_scope_is_per_api_key(gw: Any, fake_openai: FakeOpenAI) -> None:
    one, two = make_key(gw), make_key(gw)
    first, second = generate(gw, one, "shared-key"), generate(gw, two, "shared-key")
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert second.headers.get(REPLAYED) != "true"
    assert len(fake_openai.requests) == 2
    assert holds(gw, one) == [-PRICE] and holds(gw, two) == [-PRICE]
    assert_replay(second, generate(gw, two, "shared-key"))
    assert len(fake_openai.requests) == 2


@pytest.mark.parametrize("idem", ["x" * 256, b"caf\xe9", "a\x01b", "a\tb", ""],
                         ids=["256-chars", "non-ascii", "control-char", "tab", "empty"])
def test_malformed_key_is_400(gw: Any, fake_openai: FakeOpenAI, idem: str | bytes) -> None:
    """A control character makes the header itself invalid HTTP (RFC 9110 §5.5): the HTTP parser
    refuses the request before the gateway reads its headers, in the same error shape."""
    key = make_key(gw)
    code, param = ("invalid_http_request", None) if idem == "a\x01b" else (None, "Idempotency-Key")
    assert_error(generate(gw, key, idem), 400, code, param)
    upload = gw.http.post("/v1/uploads", files={"file": ("a.png", png_bytes(), "image/png")},
                          headers=headers(key, idem))
    assert_error(upload, 400, code, param)
    assert fake_openai.requests == []
    assert usage(gw, key)["balance_micros"] == 1_000_000 and holds(gw, key) == []


def test_key_of_255_printable_chars_is_accepted(gw: Any, fake_openai: FakeOpenAI) -> None:
    key = make_key(gw)
    idem = ("~!#-_.:" * 40)[:255]
    first = generate(gw, key, idem)
    assert first.status_code == 200, first.text
    assert_replay(first, generate(gw, key, idem))
    assert len(fake_openai.requests) == 1


def test_stream_with_a_key_is_400(gw: Any, fake_openai: FakeOpenAI) -> None:
    key = make_key(gw)
    answer = generate(gw, key, "gen-stream", model="demo", size="64x64", stream=True)
    assert_error(answer, 400, None, "Idempotency-Key")
    assert usage(gw, key)["balance_micros"] == 1_000_000


def test_multipart_edit_through_the_sdk_is_replayed(gw: Any, fake_openai: FakeOpenAI) -> None:
    key = make_key(gw)
    client = OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=30)
    src = png_bytes(256, 256, (200, 0, 0))

    def edit(image: bytes, prompt: str = "make it blue") -> Any:
        return client.images.with_raw_response.edit(
            model="remote", image=("src.png", image, "image/png"), prompt=prompt, size="256x256",
            extra_headers={"Idempotency-Key": "edit-1"})
    first, second = edit(src), edit(src)  # a new multipart boundary each time
    assert second.headers.get(REPLAYED) == "true" and first.headers.get(REPLAYED) != "true"
    assert second.content == first.content
    assert first.parse().data[0].b64_json == second.parse().data[0].b64_json
    assert len(fake_openai.requests) == 1
    for changed in (lambda: edit(png_bytes(256, 256, (0, 200, 0))), lambda: edit(src, "make it green")):
        with pytest.raises(openai.APIStatusError) as info:
            changed()
        assert info.value.status_code == 409, info.value.response.text
        assert info.value.response.json()["error"]["code"] == "idempotency_key_reused"
    assert len(fake_openai.requests) == 1
    assert holds(gw, key) == [-PRICE]


def test_uploads_are_idempotent(gw: Any) -> None:
    key = make_key(gw)
    image = png_bytes(96, 96)

    def upload(data: bytes) -> httpx.Response:
        return gw.http.post("/v1/uploads", files={"file": ("a.png", data, "image/png")}, headers=headers(key, "up-1"))
    first = upload(image)
    assert first.status_code == 200, first.text
    second = upload(image)
    assert_replay(first, second)
    assert second.json()["id"] == first.json()["id"]
    assert_error(upload(png_bytes(96, 96, (1, 2, 3))), 409, "idempotency_key_reused")
    stored = [p.name for p in Path(gw.state.artifacts.dir).glob("art_*")]
    assert stored and all(name.startswith(first.json()["id"]) for name in stored), stored  # one artifact


def test_async_task_with_a_key_replays_the_same_task(gw: Any, fake_openai: FakeOpenAI) -> None:
    key = make_key(gw)
    first = generate(gw, key, "task-1", **{"async": True})
    assert first.status_code == 202, first.text
    task = first.json()
    assert task["id"].startswith("task_") and first.headers["location"] == f"/v1/tasks/{task['id']}"
    second = generate(gw, key, "task-1", **{"async": True})
    assert_replay(first, second)
    assert second.json()["id"] == task["id"]
    deadline = time.monotonic() + 30
    while (state := gw.http.get(f"/v1/tasks/{task['id']}", headers=headers(key, None)).json())["status"] in (
            "queued", "running"):
        assert time.monotonic() < deadline, state
        time.sleep(0.1)
    assert state["status"] == "succeeded", state
    assert_replay(first, generate(gw, key, "task-1", **{"async": True}))
    assert len(fake_openai.requests) == 1
    seen = usage(gw, key)
    assert seen["balance_micros"] == 1_000_000 - PRICE and holds(gw, key) == [-PRICE]


def test_replay_across_replicas_on_postgresql(tmp_path: Path, fake_openai: FakeOpenAI) -> None:
    """Records live in the state store: a retry landing on the other replica is replayed, once charged."""
    with pg_database() as url, replicas(tmp_path, url, upstream_url=fake_openai.base_url) as (one, two):
        key = make_key(one)
        first = generate(one, key, "pg-1")
        assert first.status_code == 200, first.text
        assert_replay(first, generate(two, key, "pg-1"))
        assert_error(generate(two, key, "pg-1", prompt="something else"), 409, "idempotency_key_reused")
        fake_openai.behave(delay_s=1.0)
        race([one, two], key, "pg-race")
        assert len(fake_openai.requests) == 2
        seen = usage(two, key)
        assert seen["balance_micros"] == 1_000_000 - 2 * PRICE
        assert sum(e["amount_micros"] for e in seen["ledger"]) == seen["balance_micros"]
