"""Webhooks against a receiver on 127.0.0.1 (`webhooks.allow_http`/`allow_private` on, as only tests
may): Standard Webhooks signatures checked with the `standardwebhooks` package, retries under one
webhook-id, Retry-After, 410, every surface's async requests, and the URLs refused at submission."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import httpx
import orjson
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.conftest import Gateway, StartGateway, base_config, png_bytes
from tests.fakes.webhook_receiver import Answer, Received, WebhookReceiver

ADMIN = "admin-secret-for-webhooks"
FAST = {"allow_http": True, "allow_private": True, "backoff_s": [0.2], "poll_s": 0.05, "timeout_s": 5}


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as fake:
        yield fake


def hooks_config(tmp_path: Path, **webhooks: Any) -> dict[str, Any]:
    cfg = base_config(tmp_path)
    cfg["auth"] = {"enabled": True, "admin_key": ADMIN}
    cfg["webhooks"] = {**FAST, **webhooks}
    return cfg


@pytest.fixture
def gw(tmp_path: Path, start_gateway: StartGateway) -> Gateway:
    return start_gateway(hooks_config(tmp_path))


class Client(Protocol):
    """A gateway as these helpers reach it: in this process (`Gateway`) or a `serve` process."""

    http: httpx.Client
    url: str


def make_key(gw: Client) -> tuple[str, str, str]:
    """(key id, key, webhook secret)."""
    made = gw.http.post("/admin/keys", json={"name": "hooks", "credits": "1.00"},
                        headers={"authorization": f"Bearer {ADMIN}"})
    assert made.status_code == 201, made.text
    body = made.json()
    assert body["webhook_secret"].startswith("whsec_")
    return body["id"], body["key"], body["webhook_secret"]


def submit(gw: Client, key: str, url: str, path: str = "/v1/images/generations", **fields: Any) -> httpx.Response:
    body = {"model": "demo", "prompt": "p", "size": "64x64", "async": True, "webhook_url": url, **fields}
    return gw.http.post(path, json=body, headers={"authorization": f"Bearer {key}"})


def task(gw: Client, key: str, task_id: str) -> dict[str, Any]:
    return dict(gw.http.get(f"/v1/tasks/{task_id}", headers={"authorization": f"Bearer {key}"}).json())


def delivered(gw: Client, key: str, task_id: str, status: str = "delivered", timeout: float = 20) -> dict[str, Any]:
    """The task once its webhook reached `status`."""
    deadline = time.monotonic() + timeout
    while (seen := task(gw, key, task_id)).get("webhook", {}).get("status") != status:
        assert time.monotonic() < deadline, seen.get("webhook")
        time.sleep(0.05)
    return seen


def verified(secret: str, received: Received) -> dict[str, Any]:
    return dict(Webhook(secret).verify(received.body, received.headers))


def test_the_event_is_signed_thin_and_verifies(gw: Gateway, receiver: WebhookReceiver) -> None:
    _, key, secret = make_key(gw)
    answer = submit(gw, key, receiver.hook("a"))
    assert answer.status_code == 202, answer.text
    task_id = answer.json()["id"]
    [got] = receiver.wait("a", 1)
    event = verified(secret, got)
    assert event["type"] == "image.task.succeeded" and event["data"]["id"] == task_id
    item = event["data"]["result"]["data"][0]
    assert "b64_json" not in item and item["url"].startswith(gw.url)  # links, never bytes
    assert httpx.get(item["url"]).status_code == 200
    assert got.headers["webhook-id"].startswith("msg_") and got.headers["content-type"] == "application/json"
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(got.body.replace(b"succeeded", b"failed"), got.headers)
    view = delivered(gw, key, task_id)["webhook"]
    assert view["attempts"] == 1 and view["last_status"] == 200 and view["id"] == got.headers["webhook-id"]
    metrics = gw.http.get("/metrics").text
    assert 'imagegate_webhook_deliveries_total{outcome="delivered"} 1.0' in metrics


def test_retries_keep_one_webhook_id_until_a_2xx(gw: Gateway, receiver: WebhookReceiver) -> None:
    _, key, secret = make_key(gw)
    receiver.answer("r", Answer(500), Answer(500), Answer(200))
    task_id = submit(gw, key, receiver.hook("r")).json()["id"]
    view = delivered(gw, key, task_id)["webhook"]
    got = receiver.at("r")
    assert len(got) == 3 and len({r.headers["webhook-id"] for r in got}) == 1
    assert [verified(secret, r)["data"]["id"] for r in got] == [task_id] * 3
    assert view["attempts"] == 3 and view["last_status"] == 200


def test_retry_after_is_honoured(gw: Gateway, receiver: WebhookReceiver) -> None:
    _, key, _ = make_key(gw)
    receiver.answer("slow", Answer(429, {"retry-after": "1"}))
    task_id = submit(gw, key, receiver.hook("slow")).json()["id"]
    delivered(gw, key, task_id)
    first, second = receiver.at("slow")
    assert second.at - first.at >= 0.95  # not the 0.2 s backoff


def test_410_disables_the_url_for_that_key(gw: Gateway, receiver: WebhookReceiver) -> None:
    key_id, key, _ = make_key(gw)
    receiver.answer("gone", Answer(410))
    task_id = submit(gw, key, receiver.hook("gone")).json()["id"]
    assert delivered(gw, key, task_id, "disabled")["webhook"]["attempts"] == 1
    balance = gw.http.get("/v1/usage", headers={"authorization": f"Bearer {key}"}).json()
    refused = submit(gw, key, receiver.hook("gone"))
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "webhook_url_disabled"
    assert gw.http.get("/v1/usage", headers={"authorization": f"Bearer {key}"}).json() == balance
    assert len(receiver.at("gone")) == 1
    other = submit(gw, key, receiver.hook("other"))
    assert other.status_code == 202 and delivered(gw, key, other.json()["id"])
    rotated = gw.http.post(f"/admin/keys/{key_id}/webhook-secret", headers={"authorization": f"Bearer {ADMIN}"})
    assert rotated.status_code == 200
    again = submit(gw, key, receiver.hook("gone"))  # a new secret: a fresh start for that URL
    [_, last] = receiver.wait("gone", 2)
    verified(rotated.json()["webhook_secret"], last)
    assert again.status_code == 202


def test_edits_and_image_to_image_carry_a_webhook(gw: Gateway, receiver: WebhookReceiver) -> None:
    _, key, secret = make_key(gw)
    image = png_bytes(64, 64, (5, 6, 7))
    i2i = submit(gw, key, receiver.hook("i2i"), "/v1/images/image-to-image",
                 image="data:image/png;base64," + base64.b64encode(image).decode())
    assert i2i.status_code == 202, i2i.text
    edit = gw.http.post("/v1/images/edits", headers={"authorization": f"Bearer {key}"},
                        files={"image": ("in.png", image, "image/png")},
                        data={"model": "demo", "prompt": "p", "async": "true", "webhook_url": receiver.hook("edit")})
    assert edit.status_code == 202, edit.text
    for path, answer in (("i2i", i2i), ("edit", edit)):
        [got] = receiver.wait(path, 1)
        assert verified(secret, got)["data"]["id"] == answer.json()["id"]


def test_native_async_requests_carry_a_webhook(tmp_path: Path, start_gateway: StartGateway,
                                               receiver: WebhookReceiver) -> None:
    cfg = hooks_config(tmp_path)
    cfg["models"]["flux"] = {"price_per_mp": 0.001, "routes": [{"provider": "demo", "model": "demo"}],
                             "limits": {"min_side": 64, "max_side": 1024, "multiple_of": 32, "max_n": 1}}
    cfg["surfaces"] = {"native": {"flux": "flux"}}
    gw = start_gateway(cfg)
    _, key, secret = make_key(gw)
    answer = gw.http.post("/v2/image/flux/generate", json={"prompt": "p", "width": 256, "height": 256, "async": True,
                                                            "webhook_url": receiver.hook("native")},
                          headers={"authorization": f"Bearer {key}"})
    assert answer.status_code == 202, answer.text
    [got] = receiver.wait("native", 1)
    event = verified(secret, got)
    assert event["data"]["id"] == answer.json()["task_address"] and event["type"] == "image.task.succeeded"


@pytest.mark.parametrize(("url", "code"), [
    ("https://127.0.0.1/hook", "webhook_url_not_allowed"),
    ("https://169.254.169.254/latest/meta-data", "webhook_url_not_allowed"),
    ("https://[::1]/hook", "webhook_url_not_allowed"),
    ("https://localhost/hook", "webhook_url_not_allowed"),  # a name that resolves to a loopback address
    ("http://example.com/hook", "webhook_url_not_allowed"),
    ("https://user:s3cr3tpw@example.com/hook", "invalid_webhook_url"),
])
def test_unsafe_webhook_urls_are_refused_at_submission(tmp_path: Path, start_gateway: StartGateway, url: str,
                                                       code: str) -> None:
    gw = start_gateway(hooks_config(tmp_path, allow_http=False, allow_private=False))
    _, key, _ = make_key(gw)
    usage = gw.http.get("/v1/usage", headers={"authorization": f"Bearer {key}"}).json()
    refused = submit(gw, key, url)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == code, refused.text
    assert refused.json()["error"]["param"] == "webhook_url" and "s3cr3tpw" not in refused.text
    assert gw.http.get("/v1/usage", headers={"authorization": f"Bearer {key}"}).json() == usage  # nothing held


def test_a_webhook_needs_an_async_request_and_a_secret(tmp_path: Path, start_gateway: StartGateway,
                                                       receiver: WebhookReceiver) -> None:
    gw = start_gateway(hooks_config(tmp_path))
    _, key, _ = make_key(gw)
    sync = submit(gw, key, receiver.hook("s"), **{"async": False})
    assert sync.status_code == 400 and sync.json()["error"]["code"] == "webhook_needs_async"
    cfg = base_config(tmp_path / "open")
    cfg["webhooks"] = FAST  # auth off and no webhooks.secret: nothing to sign with
    open_gw = start_gateway(cfg)
    refused = open_gw.http.post("/v1/images/generations", json={"model": "demo", "prompt": "p", "async": True,
                                                                 "webhook_url": receiver.hook("s")})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "webhook_secret_missing"
    assert receiver.at("s") == []


def test_with_auth_off_the_configured_secret_signs(tmp_path: Path, start_gateway: StartGateway,
                                                   receiver: WebhookReceiver) -> None:
    secret = "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0IQ=="
    cfg = base_config(tmp_path)
    cfg["webhooks"] = {**FAST, "secret": secret}
    gw = start_gateway(cfg)
    answer = gw.http.post("/v1/images/generations", json={"model": "demo", "prompt": "p", "async": True,
                                                           "webhook_url": receiver.hook("open")})
    assert answer.status_code == 202
    [got] = receiver.wait("open", 1)
    assert verified(secret, got)["data"]["id"] == answer.json()["id"]
    assert orjson.loads(got.body)["data"]["status"] == "succeeded"
