"""POST /v1/images/image-to-image (seed 003), the task envelope, per-image prices in credits, and
inputs and results as reusable artifacts — through a live gateway over plain HTTP.

Behind it: the `demo` model, and a per-image-priced model whose route is the fake OpenAI upstream
(which can answer fewer images than asked, or fail).
"""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import StartGateway, base_config, decode, png_bytes
from tests.fakes.openai_upstream import FakeOpenAI
from tests.test_url_inputs import ImageServer

ADMIN = "admin-secret-for-i2i-tests"
PRICES = {"text_to_image": {"standard": 0.05, "hd": 0.30}, "image_to_image": {"standard": 0.06, "hd": 0.32}}
I2I = "/v1/images/image-to-image"


@pytest.fixture(scope="module")
def images() -> Iterator[ImageServer]:
    with ImageServer() as server:
        yield server


def i2i_config(tmp: Path, upstream_url: str, *, private_urls: bool = True) -> dict[str, Any]:
    cfg = base_config(tmp, upstream_url)
    cfg["auth"] = {"enabled": True, "admin_key": ADMIN}
    cfg["billing"] = {"credits_per_usd": 1000}
    cfg["inputs"] = {"allow_http": private_urls, "allow_private": private_urls}
    limits = {"min_side": 64, "max_side": 1024, "multiple_of": 8, "max_n": 4}
    cfg["models"]["studio"] = {"price_per_image": PRICES, "limits": limits, "default_size": "256x256",
                               "quality": {"hd": {"steps": 40}}, "routes": [{"provider": "up", "model": "studio-x"}]}
    cfg["models"]["demo-i2i"] = {"price_per_image": PRICES, "limits": limits, "default_size": "128x128",
                                 "routes": [{"provider": "demo", "model": "demo"}]}
    return cfg


class Client:
    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=30)
        made = self.http.post("/admin/keys", json={"name": "i2i", "credits": "10.00"},
                              headers={"authorization": f"Bearer {ADMIN}"})
        assert made.status_code == 201, made.text
        self.key = made.json()["key"]
        self.headers = {"authorization": f"Bearer {self.key}"}

    def post(self, path: str, **body: Any) -> httpx.Response:
        return self.http.post(path, json=body, headers=self.headers)

    def task(self, answer: httpx.Response) -> dict[str, Any]:
        """The finished task of a 202 answer (polled)."""
        assert answer.status_code == 202, answer.text
        task_id = answer.json()["task_id"]
        assert answer.json()["id"] == task_id
        deadline = time.monotonic() + 30
        while True:
            task = self.http.get(f"/v1/tasks/{task_id}", headers=self.headers).json()
            if task["status"] in ("succeeded", "failed", "canceled"):
                return dict(task)
            assert time.monotonic() < deadline, task
            time.sleep(0.05)

    def balance(self) -> int:
        seen = self.http.get("/v1/usage", headers=self.headers).json()
        assert sum(e["amount_micros"] for e in seen["ledger"]) == seen["balance_micros"]
        return int(seen["balance_micros"])


@pytest.fixture
def client(tmp_path: Path, fake_openai: FakeOpenAI, start_gateway: StartGateway) -> Client:
    return Client(start_gateway(i2i_config(tmp_path, fake_openai.base_url)).url)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def stored(tmp_path: Path) -> set[str]:
    return {p.name for p in (tmp_path / "artifacts").glob("art_*.json")}


def test_data_uri_to_task_to_artifact_chained_into_a_second_call(client: Client, images: ImageServer) -> None:
    first = client.task(client.post(I2I, model="demo-i2i", prompt="a boat", image=data_uri(png_bytes(96, 64)),
                                    extra_images=[f"{images.url}/x.png"], aspect_ratio="16:9", n=2, seed=4))
    assert first["status"] == "succeeded", first
    output = first["output"]["images"]
    assert len(output) == 2 and all(item["artifact_id"].startswith("art_") for item in output)
    fetched = client.http.get(output[0]["url"])  # a signed URL: no key needed
    assert fetched.status_code == 200 and decode(base64.b64encode(fetched.content).decode()).size[0] > 0
    kept = [item["artifact_id"] for item in first["result"]["inputs"]]
    assert len(kept) == 2  # the data URI and the URL, now the caller's artifacts
    again = client.post(I2I, model="demo-i2i", prompt="the same boat, at night", image=output[0]["artifact_id"],
                        extra_images=[kept[1]], aspect_ratio="1:1", seed=5)
    second = client.task(again)
    assert second["status"] == "succeeded" and second["result"]["inputs"] == [
        {"artifact_id": output[0]["artifact_id"]}, {"artifact_id": kept[1]}]


def test_an_uploaded_artifact_as_the_image_and_a_synchronous_answer(client: Client) -> None:
    upload = client.http.post("/v1/uploads", json={"file": data_uri(png_bytes(64, 64))}, headers=client.headers)
    art = upload.json()["id"]
    answer = client.post(I2I, model="demo-i2i", prompt="p", image=art, **{"async": False})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["inputs"] == [{"artifact_id": art}] and body["data"][0]["artifact_id"].startswith("art_")
    assert decode(body["data"][0]["b64_json"]).size == (64, 64)  # auto: the input's size
    content = client.http.get(f"/v1/artifacts/{body['data'][0]['artifact_id']}/content", headers=client.headers)
    assert content.content == base64.b64decode(body["data"][0]["b64_json"])  # the same bytes, kept


def test_per_image_prices_standard_and_hd_in_credits(client: Client) -> None:
    start = client.balance()
    standard = client.post("/v1/images/generations", model="studio", prompt="p", n=2)
    assert standard.status_code == 200, standard.text
    assert standard.json()["billing"]["price_per_image"] == 0.05 and standard.json()["billing"]["images"] == 2
    hd = client.post("/v1/images/generations", model="studio", prompt="p", quality="high")  # OpenAI's high → hd
    assert hd.status_code == 200 and hd.json()["billing"]["quality"] == "hd"
    assert client.balance() == start - 2 * 50_000 - 300_000
    card = client.http.get("/v1/models/studio", headers=client.headers).json()
    assert card["price_per_image"] == PRICES and "price_per_mp" not in card


def test_four_asked_three_delivered_refunds_one(client: Client, fake_openai: FakeOpenAI) -> None:
    fake_openai.behave(mode="few")
    start = client.balance()
    task = client.task(client.post(I2I, model="studio", prompt="p", image=data_uri(png_bytes(256, 256)), n=4,
                                   quality="hd", aspect_ratio="1:1"))
    assert task["status"] == "succeeded" and len(task["output"]["images"]) == 3
    billing = task["billing"]
    assert (billing["held_credits"], billing["charged_credits"], billing["refunded_credits"]) == (1280, 960, 320)
    assert client.balance() == start - 3 * 320_000
    assert fake_openai.last.form["steps"] == "40"  # the model's hd preset reached the upstream


def test_a_failed_task_refunds_in_full(client: Client, fake_openai: FakeOpenAI) -> None:
    fake_openai.behave(fail_status=400)
    start = client.balance()
    task = client.task(client.post(I2I, model="studio", prompt="p", image=data_uri(png_bytes(256, 256)), n=2))
    assert task["status"] == "failed" and task["billing"]["refunded_credits"] == task["billing"]["held_credits"] == 120
    assert task["output"] is None and client.balance() == start


def test_tenancy_of_inputs(tmp_path: Path, fake_openai: FakeOpenAI, start_gateway: StartGateway) -> None:
    gw = start_gateway(i2i_config(tmp_path, fake_openai.base_url))
    mine, theirs = Client(gw.url), Client(gw.url)
    made = mine.post(I2I, model="demo-i2i", prompt="p", image=data_uri(png_bytes(64, 64)), **{"async": False})
    art = made.json()["data"][0]["artifact_id"]
    refused = theirs.post(I2I, model="demo-i2i", prompt="p", image=art)
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "artifact_not_found"


BAD = [
    ({"quality": "hd", "aspect_ratio": "auto"}, 400, "aspect_ratio"),
    ({"quality": "hd"}, 400, "aspect_ratio"),
    ({"extra_images": ["IMG"] * 16}, 400, "extra_images"),
    ({"n": 5}, 400, "n"),
    ({"aspect_ratio": "5:4"}, 400, "aspect_ratio"),
    ({"image": None}, 400, "image"),
    ({"image": "art_" + "x" * 24}, 404, "image"),
    ({"image": "https://10.0.0.7/x.png"}, 400, "image"),
    ({"image": "http://127.0.0.1:9/x.png"}, 400, "image"),
]


@pytest.mark.parametrize(("fields", "status", "param"), BAD)
def test_bad_image_to_image_changes_nothing(tmp_path: Path, fake_openai: FakeOpenAI, start_gateway: StartGateway,
                                            fields: dict[str, Any], status: int, param: str) -> None:
    client = Client(start_gateway(i2i_config(tmp_path, fake_openai.base_url, private_urls=False)).url)
    before, start = stored(tmp_path), client.balance()
    body = {"model": "studio", "prompt": "p", "image": data_uri(png_bytes(64, 64)), **fields}
    body = {k: v for k, v in body.items() if v is not None}
    good = data_uri(png_bytes(64, 64))
    body["extra_images"] = [good if ref == "IMG" else ref for ref in body.get("extra_images", [])]
    answer = client.post(I2I, **body)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["param"] == param
    assert client.balance() == start and stored(tmp_path) == before and fake_openai.requests == []


def check_config(tmp_path: Path, model: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"providers": {"demo": {"type": "demo"}},
                                    "models": {"m": {**model, "routes": [{"provider": "demo", "model": "demo"}]}}}))
    return subprocess.run([sys.executable, "-m", "imagegate", "check-config", str(path)], capture_output=True,
                          text=True, check=False)


def test_check_config_wants_exactly_one_price_kind(tmp_path: Path) -> None:
    both = check_config(tmp_path, {"price_per_mp": 0.01, "price_per_image": PRICES})
    assert both.returncode == 1 and "not both" in both.stderr
    neither = check_config(tmp_path, {})
    assert neither.returncode == 1 and "models.m: no price" in neither.stderr
    no_standard = check_config(tmp_path, {"price_per_image": {"text_to_image": {"hd": 1}}})
    assert no_standard.returncode == 1 and "standard" in no_standard.stderr
    assert check_config(tmp_path, {"price_per_image": PRICES}).returncode == 0
    assert check_config(tmp_path, {"price_per_mp": 0}).returncode == 0
