"""Seed 004's family endpoints through a live gateway: each family's own fields reach the route's
upstream (fake BFL, Gemini, OpenAI and DashScope servers on 127.0.0.1), answers keep each family's
shape, and `"async": true` answers 202 with a task address polled at /v2/tasks/{task_address}.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from PIL import Image

from tests.conftest import NO_BREAKER, UPSTREAM_KEY, StartGateway, base_config, decode, png_bytes
from tests.fakes.bfl_upstream import FakeBFL
from tests.fakes.dashscope_upstream import FakeDashScope
from tests.fakes.gemini_upstream import FakeGemini
from tests.fakes.openai_upstream import FakeOpenAI

BFL_KEY, GEMINI_KEY = "bfl_native-test-key-1", "gemini-native-test-key-2"
LIMITS = {"min_side": 64, "max_side": 4096, "multiple_of": 16, "max_n": 4}


@pytest.fixture(scope="module")
def bfl() -> Iterator[FakeBFL]:
    with FakeBFL(BFL_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def gemini() -> Iterator[FakeGemini]:
    with FakeGemini(GEMINI_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def dashscope() -> Iterator[FakeDashScope]:
    with FakeDashScope(UPSTREAM_KEY) as server:
        yield server


@pytest.fixture(autouse=True)
def fresh(bfl: FakeBFL, gemini: FakeGemini, dashscope: FakeDashScope) -> None:
    bfl.reset()
    gemini.reset()
    dashscope.behave()
    dashscope.requests.clear()


def native_config(tmp: Path, openai_url: str, bfl: FakeBFL, gemini: FakeGemini, dashscope: FakeDashScope,
                  native: dict[str, str] | None = None) -> dict[str, Any]:
    cfg = base_config(tmp, openai_url)
    cfg["providers"].update({
        "bfl": {"type": "bfl", "base_url": bfl.url, "api_key": BFL_KEY, "poll_interval_s": 0.01,
                "poll_max_interval_s": 0.05, "safety_tolerance": 5, **NO_BREAKER},
        "gem": {"type": "gemini", "base_url": gemini.url, "api_key": GEMINI_KEY, **NO_BREAKER},
        "ds": {"type": "dashscope", "base_url": dashscope.url, "api_key": UPSTREAM_KEY, "poll_interval_s": 0.01,
               **NO_BREAKER},
    })

    def model(provider: str, upstream: str, **more: Any) -> dict[str, Any]:
        return {"price_per_mp": 0.01, "limits": LIMITS, "routes": [{"provider": provider, "model": upstream}], **more}

    cfg["models"].update({
        "flux-2-pro": model("bfl", "flux-2-pro"), "gemini-image": model("gem", "gemini-3-pro-image-preview"),
        "gpt-image": model("up", "gpt-image-1"),
        "qwen-image": model("ds", "qwen-image-plus", default_size="1328x1328", limits={**LIMITS, "multiple_of": 4}),
        "qwen-image-edit": model("ds", "qwen-image-edit-plus"),
    })
    cfg["surfaces"] = {"native": native if native is not None else {
        "flux": "flux-2-pro", "gemini-3": "gemini-image", "gpt-image": "gpt-image", "qwen": "qwen-image",
        "qwen-edit": "qwen-image-edit"}}
    return cfg


@pytest.fixture
def http(tmp_path: Path, fake_openai: FakeOpenAI, bfl: FakeBFL, gemini: FakeGemini, dashscope: FakeDashScope,
         start_gateway: StartGateway) -> httpx.Client:
    return start_gateway(native_config(tmp_path, fake_openai.base_url, bfl, gemini, dashscope)).http


def ok(answer: httpx.Response) -> dict[str, Any]:
    assert answer.status_code == 200, answer.text
    body = dict(answer.json())
    assert body["model"] and body["billing"]["cost"] >= 0 and all(a.startswith("art_") for a in body["artifact_ids"])
    return body


def test_flux_generate_sends_its_fields_and_answers_base64(http: httpx.Client, bfl: FakeBFL) -> None:
    body = ok(http.post("/v2/image/flux/generate", json={
        "prompt": "a lighthouse", "width": 1024, "height": 768, "seed": 5, "safety_tolerance": 4,
        "output_format": "jpeg"}))
    [sent] = bfl.submits
    assert sent.path == "/v1/flux-2-pro"
    assert (sent.json["prompt"], sent.json["width"], sent.json["height"]) == ("a lighthouse", 1024, 768)
    assert sent.json["seed"] == 5 and sent.json["safety_tolerance"] == 4 and sent.json["output_format"] == "jpeg"
    [image] = body["images"]
    assert decode(image).format == "JPEG" and decode(image).size == (1024, 768)
    assert body["seeds"] == [5] and body["model"] == "flux-2-pro"


def test_flux_safety_tolerance_stays_within_the_operators_bound(http: httpx.Client, bfl: FakeBFL) -> None:
    ok(http.post("/v2/image/flux/generate", json={"prompt": "p", "width": 512, "height": 512, "safety_tolerance": 6}))
    assert bfl.submits[0].json["safety_tolerance"] == 5  # the provider's configured 5, not the asked 6


def test_flux_reference_images_are_inputs(http: httpx.Client, bfl: FakeBFL) -> None:
    refs = [base64.b64encode(png_bytes(64, 64, (i * 40, 0, 0))).decode() for i in range(2)]
    body = ok(http.post("/v2/image/flux/generate", json={"prompt": "p", "width": 512, "height": 512,
                                                         "input_image": refs[0], "input_image_2": refs[1]}))
    sent = bfl.submits[0].json
    assert "input_image" in sent and "input_image_2" in sent and body["images"]


def test_gemini_takes_its_ratio_and_tier_as_asked(http: httpx.Client, gemini: FakeGemini) -> None:
    body = ok(http.post("/v2/image/gemini-3/generate", json={"prompt": "a fox", "aspect_ratio": "4:5",
                                                             "image_size": "2K"}))
    assert gemini.last.body["generationConfig"]["imageConfig"] == {"aspectRatio": "4:5", "imageSize": "2K"}
    width, height = decode(body["images"][0]).size
    assert abs(width / height - 0.8) < 0.02 and 1800 < height < 2400


def test_gpt_image_generate_answers_urls(http: httpx.Client, fake_openai: FakeOpenAI) -> None:
    body = ok(http.post("/v2/image/gpt-image/generate", json={"prompt": "a cat", "size": "1536x1024",
                                                              "quality": "high", "n": 2}))
    sent = fake_openai.last.json or {}
    assert (sent["model"], sent["size"], sent["quality"], sent["n"]) == ("gpt-image-1", "1536x1024", "high", 2)
    assert len(body["images"]) == 2
    fetched = http.get(body["images"][0])  # signed: no key
    assert fetched.status_code == 200 and Image.open(io.BytesIO(fetched.content)).size == (1536, 1024)


def test_gpt_image_edit_converts_the_white_mask_once(http: httpx.Client, fake_openai: FakeOpenAI) -> None:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # white = edit: the left half
    buf = io.BytesIO()
    mask.save(buf, "PNG")
    ok(http.post("/v2/image/gpt-image/edit", json={
        "prompt": "a door", "image": base64.b64encode(png_bytes(64, 64)).decode(),
        "mask": base64.b64encode(buf.getvalue()).decode(), "size": "1024x1024"}))
    files = {field: data for field, _, data in fake_openai.last.files}
    alpha = Image.open(io.BytesIO(files["mask"])).convert("RGBA").getchannel("A")
    assert alpha.getpixel((5, 5)) == 0 and alpha.getpixel((60, 5)) == 255  # OpenAI's: transparent = edit


def test_qwen_generate_answers_urls_valid_for_seven_days(http: httpx.Client, dashscope: FakeDashScope) -> None:
    body = ok(http.post("/v2/image/qwen/generate", json={"prompt": "a temple", "size": "1328x1328", "seed": 9}))
    [sent] = dashscope.submits()
    assert sent.json["parameters"]["size"] == "1328*1328" and sent.json["parameters"]["seed"] == 9
    [url] = body["urls"]
    expires = int(parse_qs(urlsplit(url).query)["expires"][0])
    assert 7 * 86400 - 120 < expires - time.time() <= 7 * 86400
    assert http.get(url).status_code == 200


def test_qwen_edit_takes_a_base64_image(http: httpx.Client, dashscope: FakeDashScope) -> None:
    src = png_bytes(512, 512)
    body = ok(http.post("/v2/image/qwen/edit", json={"prompt": "make it blue", "size": "512x512",
                                                     "image": base64.b64encode(src).decode()}))
    [sent] = dashscope.submits()
    assert sent.json["model"] == "qwen-image-edit-plus" and body["urls"]


def test_async_answers_a_task_address_and_the_same_body(http: httpx.Client, bfl: FakeBFL) -> None:
    accepted = http.post("/v2/image/flux/generate", json={"prompt": "p", "width": 512, "height": 512, "seed": 3,
                                                          "async": True})
    assert accepted.status_code == 202, accepted.text
    address = accepted.json()["task_address"]
    assert accepted.json()["status"] in ("queued", "running")
    deadline = time.monotonic() + 20
    while (task := http.get(f"/v2/tasks/{address}").json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, task
        time.sleep(0.05)
    assert task["status"] == "succeeded" and task["seeds"] == [3]
    assert decode(task["images"][0]).size == (512, 512) and task["artifact_ids"][0].startswith("art_")
    assert http.get("/v2/tasks/task_nope").status_code == 404


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v2/image/flux/generate", {"width": 1000}, "width"),
    ("/v2/image/flux/generate", {"safety_tolerance": 9}, "safety_tolerance"),
    ("/v2/image/gemini-3/generate", {"aspect_ratio": "7:3"}, "aspect_ratio"),
    ("/v2/image/gemini-3/generate", {"image_size": "8K"}, "image_size"),
    ("/v2/image/gpt-image/generate", {"n": 5}, "n"),
    ("/v2/image/gpt-image/generate", {"style": "vivid"}, "style"),
    ("/v2/image/qwen/generate", {"size": "big"}, "size"),
    ("/v2/image/qwen/edit", {}, "image"),
])
def test_a_bad_field_is_a_400_and_nothing_is_sent(http: httpx.Client, bfl: FakeBFL, gemini: FakeGemini,
                                                  dashscope: FakeDashScope, fake_openai: FakeOpenAI, path: str,
                                                  body: dict[str, Any], param: str) -> None:
    answer = http.post(path, json={"prompt": "p", **body})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param
    assert bfl.submits == [] and dashscope.submits() == [] and fake_openai.requests == []


def test_an_unmapped_family_is_a_404_naming_the_key(tmp_path: Path, fake_openai: FakeOpenAI, bfl: FakeBFL,
                                                    gemini: FakeGemini, dashscope: FakeDashScope,
                                                    start_gateway: StartGateway) -> None:
    gw = start_gateway(native_config(tmp_path, fake_openai.base_url, bfl, gemini, dashscope, native={}))
    answer = gw.http.post("/v2/image/flux/generate", json={"prompt": "p"})
    assert answer.status_code == 404 and "surfaces.native.flux" in answer.json()["error"]["message"]


def test_with_auth_on_the_native_endpoints_and_tasks_need_a_key(tmp_path: Path, fake_openai: FakeOpenAI,
                                                               bfl: FakeBFL, gemini: FakeGemini,
                                                               dashscope: FakeDashScope,
                                                               start_gateway: StartGateway) -> None:
    cfg = native_config(tmp_path, fake_openai.base_url, bfl, gemini, dashscope)
    cfg["auth"] = {"enabled": True, "admin_key": "adm"}
    gw = start_gateway(cfg)
    body = {"prompt": "p", "width": 256, "height": 256}
    for path in ("/v2/image/flux/generate", "/v2/image/qwen/generate"):
        refused = gw.http.post(path, json=body)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert gw.http.get("/v2/tasks/task_0123").status_code == 401
    assert bfl.submits == []  # nothing reached the upstream
    key = gw.http.post("/admin/keys", json={"name": "n"}, headers={"authorization": "Bearer adm"}).json()["key"]
    task = gw.http.post("/v2/image/flux/generate", json={**body, "async": True},
                        headers={"authorization": f"Bearer {key}"})
    assert task.status_code == 202, task.text
    assert gw.http.get(f"/v2/tasks/{task.json()['task_address']}").status_code == 401  # not without the key
