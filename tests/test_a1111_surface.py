"""The AUTOMATIC1111 surface (`/sdapi/v1`) through real A1111 clients against a live gateway.

The `webuiapi` package and the exact request sequence of Open WebUI's Automatic1111 engine (read
from its source: GET /options, GET /sd-models, POST /options with the whole options dict back,
POST /txt2img) talk to the gateway; behind it the `demo` model, the fake OpenAI upstream and the
fake A1111 upstream (a gateway in front of an A1111 server, through an A1111 API).
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import webuiapi
from PIL import Image

from tests.conftest import UPSTREAM_KEY, Gateway, StartGateway, base_config, decode, serve_gateway
from tests.fakes.a1111_upstream import PAINT, FakeA1111, seed_color
from tests.fakes.openai_upstream import FakeOpenAI

ADMIN = "admin-secret-for-a1111-tests"
SDXL = "sd_xl_base_1.0"
LIMITS = {"min_side": 64, "max_side": 1024, "multiple_of": 8, "max_n": 4}


@pytest.fixture(scope="module")
def fake_a1111() -> Iterator[FakeA1111]:
    with FakeA1111() as server:
        yield server


@pytest.fixture(autouse=True)
def clean(fake_a1111: FakeA1111) -> None:
    fake_a1111.reset()


def surface_config(tmp: Path, openai_url: str, a1111_url: str, *, auth: bool = False) -> dict[str, Any]:
    cfg = base_config(tmp, openai_url)
    cfg["providers"]["sd"] = {"type": "a1111", "base_url": a1111_url, "sampler": "DPM++ 2M", "check_names": False,
                              "circuit": {"failures": 1_000_000}}
    cfg["models"]["sdxl"] = {"limits": LIMITS, "default_size": "512x512", "price_per_mp": 0.004,
                             "defaults": {"steps": 28, "guidance_scale": 6.5},
                             "routes": [{"provider": "sd", "model": SDXL}]}
    if auth:
        cfg["auth"] = {"enabled": True, "admin_key": ADMIN}
    return cfg


@pytest.fixture
def gw(tmp_path: Path, fake_openai: FakeOpenAI, fake_a1111: FakeA1111, start_gateway: StartGateway) -> Gateway:
    return start_gateway(surface_config(tmp_path, fake_openai.base_url, fake_a1111.url))


@pytest.fixture
def secured(tmp_path: Path, fake_openai: FakeOpenAI, fake_a1111: FakeA1111, start_gateway: StartGateway) -> Gateway:
    return start_gateway(surface_config(tmp_path, fake_openai.base_url, fake_a1111.url, auth=True))


def client(gw: Gateway, key: str | None = None, prefix: str = "") -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(baseurl=f"{gw.url}{prefix}/sdapi/v1", username="webui" if key else None, password=key)


def make_key(gw: Gateway, credits: str | None = None, **fields: Any) -> tuple[str, str]:
    body = {"name": "a1111", **({"credits": credits} if credits else {}), **fields}
    made = gw.http.post("/admin/keys", json=body, headers={"authorization": f"Bearer {ADMIN}"})
    assert made.status_code == 201, made.text
    return made.json()["key"], made.json()["id"]


def basic(key: str, user: str = "anyone") -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()}


def balance(gw: Gateway, key: str) -> int:
    seen = gw.http.get("/v1/usage", headers={"authorization": f"Bearer {key}"}).json()
    assert sum(e["amount_micros"] for e in seen["ledger"]) == seen["balance_micros"]
    assert seen["balance_micros"] is not None
    return int(seen["balance_micros"])


def png_of(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


# -- txt2img ---------------------------------------------------------------------------------------

def test_webuiapi_txt2img_on_demo_matches_the_openai_surface(gw: Gateway) -> None:
    api = client(gw)
    result = api.txt2img(prompt="a red fox", seed=7, width=128, height=96, steps=4, cfg_scale=5.0,
                         sampler_name="Euler a", batch_size=2, override_settings={"sd_model_checkpoint": "demo"})
    info = result.info
    assert [img.size for img in result.images] == [(128, 96)] * 2
    assert info["seed"] == 7 and info["all_seeds"] == [7, 8]
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (128, 96, 4, 5.0)
    assert info["sampler_name"] == "Euler a" and info["sd_model_name"] == "demo"
    assert info["index_of_first_image"] == 0
    assert info["infotexts"][1].startswith("a red fox\n") and "Seed: 8" in info["infotexts"][1]
    assert info["imagegate"]["model"] == "demo" and info["imagegate"]["provider"] == "demo"
    assert info["imagegate"]["cost"] == round(128 * 96 * 2 * 0.0015) / 1e6  # 36.864 µ$, held as 37
    # The same request on /v1 makes the same pixels: one pipeline behind both surfaces.
    same = gw.client.images.generate(model="demo", prompt="a red fox", size="128x96", n=2,
                                     extra_body={"seed": 7, "steps": 4, "guidance_scale": 5.0})
    for mine, theirs in zip(result.images, same.data or [], strict=True):
        assert mine.convert("RGB").tobytes() == decode(theirs.b64_json or "").convert("RGB").tobytes()
    assert result.parameters["prompt"] == "a red fox" and result.parameters["batch_size"] == 2


def test_txt2img_through_a_fake_a1111_sends_its_fields_upstream(gw: Gateway, fake_a1111: FakeA1111) -> None:
    result = client(gw).txt2img(prompt="a castle", negative_prompt="fog", seed=40, width=320, height=256, steps=12,
                                cfg_scale=4.5, sampler_name="Euler a", scheduler="karras", batch_size=2,
                                override_settings={"sd_model_checkpoint": "sdxl [0123456789]"})
    sent = fake_a1111.last.json
    assert fake_a1111.last.path == "/sdapi/v1/txt2img"
    assert (sent["prompt"], sent["negative_prompt"], sent["seed"]) == ("a castle", "fog", 40)
    assert (sent["width"], sent["height"], sent["steps"], sent["cfg_scale"]) == (320, 256, 12, 4.5)
    assert (sent["sampler_name"], sent["scheduler"], sent["batch_size"]) == ("Euler a", "karras", 2)
    assert sent["override_settings"]["sd_model_checkpoint"] == SDXL
    assert [img.convert("RGB").getpixel((3, 3)) for img in result.images] == [seed_color(40), seed_color(41)]
    assert result.info["all_seeds"] == [40, 41] and result.info["sampler_name"] == "Euler a"
    assert result.info["imagegate"]["provider"] == "sd"


def test_txt2img_through_a_fake_openai_upstream(gw: Gateway, fake_openai: FakeOpenAI) -> None:
    result = client(gw).txt2img(prompt="a boat", seed=3, width=512, height=256,
                                override_settings={"sd_model_checkpoint": "remote"})
    sent = fake_openai.last.json or {}
    assert (sent["model"], sent["prompt"], sent["size"], sent["n"]) == ("upstream-model-x", "a boat", "512x256", 1)
    assert result.images[0].size == (512, 256) and result.info["seed"] == 3


def test_unset_fields_take_the_models_defaults(gw: Gateway, fake_a1111: FakeA1111) -> None:
    answer = gw.http.post("/sdapi/v1/txt2img", json={"prompt": "p", "model": "sdxl"})
    assert answer.status_code == 200, answer.text
    sent = fake_a1111.last.json
    assert (sent["width"], sent["height"], sent["steps"], sent["cfg_scale"]) == (512, 512, 28, 6.5)
    assert sent["sampler_name"] == "DPM++ 2M"  # the provider's own, since the client named none
    assert json.loads(answer.json()["info"])["seed"] == sent["seed"]  # -1 → chosen by the gateway, reported


def test_send_images_false_answers_no_images(gw: Gateway) -> None:
    answer = gw.http.post("/sdapi/v1/txt2img", json={"prompt": "p", "width": 64, "height": 64, "send_images": False})
    assert answer.status_code == 200 and answer.json()["images"] == []
    assert json.loads(answer.json()["info"])["width"] == 64


# -- img2img ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("invert", [0, 1])
def test_img2img_with_an_a1111_mask(gw: Gateway, fake_a1111: FakeA1111, invert: int) -> None:
    source = Image.new("RGB", (128, 128), (0, 120, 0))
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (0, 0, 64, 128))  # white = edit: the left half
    result = client(gw).img2img(images=[source], mask_image=mask, inpainting_mask_invert=invert, prompt="a door",
                                denoising_strength=0.6, seed=2, width=128, height=128, mask_blur=6,
                                inpainting_fill=1, override_settings={"sd_model_checkpoint": "sdxl"})
    sent = fake_a1111.last.json
    assert fake_a1111.last.path == "/sdapi/v1/img2img" and sent["denoising_strength"] == 0.6
    assert Image.open(io.BytesIO(base64.b64decode(sent["init_images"][0]))).size == (128, 128)
    upstream_mask = Image.open(io.BytesIO(base64.b64decode(sent["mask"]))).convert("L")
    edited, kept = ((10, 10), (100, 10)) if invert == 0 else ((100, 10), (10, 10))
    assert upstream_mask.getpixel(edited) == 255 and upstream_mask.getpixel(kept) == 0  # white = edit, once converted
    assert (sent["mask_blur"], sent["inpainting_fill"], sent["inpainting_mask_invert"]) == (6, 1, 0)
    out = result.images[0].convert("RGB")
    assert out.getpixel(edited) == PAINT and out.getpixel(kept) == (0, 120, 0)


def test_img2img_on_demo_without_a_mask(gw: Gateway) -> None:
    source = png_of(Image.new("RGB", (96, 64), (9, 9, 9)))
    answer = gw.http.post("/sdapi/v1/img2img", json={
        "prompt": "p", "init_images": ["data:image/png;base64," + base64.b64encode(source).decode()],
        "denoising_strength": 0.3, "seed": 5})
    assert answer.status_code == 200, answer.text
    assert decode(answer.json()["images"][0]).size == (96, 64)  # no size given: the input's
    assert json.loads(answer.json()["info"])["denoising_strength"] == 0.3


# -- checkpoints and options ----------------------------------------------------------------------

def test_models_and_options_through_webuiapi(gw: Gateway, fake_a1111: FakeA1111) -> None:
    api = client(gw)
    assert api.util_get_model_names() == ["demo", "remote", "sdxl"]
    models = {m["title"]: m for m in api.get_sd_models()}
    assert models["sdxl"]["model_name"] == "sdxl" and len(models["sdxl"]["sha256"]) == 64
    assert api.util_get_current_model() == "demo"  # default_model until the caller chooses
    assert api.txt2img(prompt="before the switch", width=64, height=64).info["sd_model_name"] == "demo"
    api.util_set_model("sdxl")
    options = api.get_options()
    assert options["sd_model_checkpoint"] == "sdxl" and options["sd_checkpoint_hash"] == models["sdxl"]["sha256"]
    assert options["samples_format"] == "png"
    api.txt2img(prompt="after the switch", width=64, height=64)
    assert fake_a1111.last.json["override_settings"]["sd_model_checkpoint"] == SDXL
    assert [s["name"] for s in api.get_samplers()] == ["DPM++ 2M"]
    assert "automatic" in api.util_get_scheduler_names()
    for listing in (api.get_upscalers(), api.get_sd_vae(), api.get_loras(), api.get_prompt_styles()):
        assert listing == []
    assert api.get_embeddings() == {"loaded": {}, "skipped": {}} and api.get_scripts()["txt2img"] == []
    assert api.get_memory()["ram"]["total"] > 0 and api.get_cmd_flags()["api"] is True


def test_the_chosen_checkpoint_holds_across_replicas(tmp_path: Path, fake_openai: FakeOpenAI,
                                                     fake_a1111: FakeA1111, start_gateway: StartGateway) -> None:
    cfg = surface_config(tmp_path, fake_openai.base_url, fake_a1111.url)
    first, second = start_gateway(cfg), start_gateway(cfg)  # one state store, two gateways
    assert first.http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "remote"}).status_code == 200
    assert second.http.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "remote"


def test_options_are_kept_per_api_key(secured: Gateway) -> None:
    (one, _), (other, _) = make_key(secured), make_key(secured)
    client(secured, one).util_set_model("sdxl")
    assert client(secured, one).util_get_current_model() == "sdxl"
    assert client(secured, other).util_get_current_model() == "demo"


def test_an_unknown_checkpoint_is_a_404_never_a_swap(gw: Gateway, fake_a1111: FakeA1111) -> None:
    for request in ({"sd_model_checkpoint": "sd_xl_turbo [deadbeef12]"},):
        answer = gw.http.post("/sdapi/v1/options", json=request)
        assert answer.status_code == 404 and answer.json()["error"] == "model_not_found", answer.text
    answer = gw.http.post("/sdapi/v1/txt2img", json={"prompt": "p", "override_settings": {"sd_model_checkpoint": "x"}})
    assert answer.status_code == 404 and set(answer.json()) == {"error", "detail", "body", "errors"}
    assert fake_a1111.generations == [] and gw.http.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "demo"


# -- Open WebUI's A1111 engine, request for request ---------------------------------------------

def test_open_webui_engine_sequence(secured: Gateway, fake_openai: FakeOpenAI) -> None:
    key, _ = make_key(secured, credits="5.00")
    auth = basic(key, user="openwebui")
    http = secured.http
    options = http.get("/sdapi/v1/options", headers=auth).json()  # "verify URL", then the current model
    assert options["sd_model_checkpoint"] == "demo"
    models = [{"id": m["title"], "name": m["model_name"]} for m in http.get("/sdapi/v1/sd-models", headers=auth).json()]
    assert {"id": "remote", "name": "remote"} in models
    options["sd_model_checkpoint"] = "remote"  # set_image_model: the whole options dict goes back
    assert http.post("/sdapi/v1/options", json=options, headers=auth).status_code == 200
    assert http.get("/sdapi/v1/options", headers=auth).json()["sd_model_checkpoint"] == "remote"
    answer = http.post("/sdapi/v1/txt2img", headers=auth, json={
        "prompt": "a lighthouse", "batch_size": 1, "width": 512, "height": 512, "steps": 20,
        "negative_prompt": "blurry"})
    assert answer.status_code == 200, answer.text
    res = answer.json()
    assert decode(res["images"][0]).size == (512, 512) and json.loads(res["info"])["sd_model_name"] == "remote"
    sent = fake_openai.last.json or {}
    assert (sent["model"], sent["prompt"], sent["size"]) == ("upstream-model-x", "a lighthouse", "512x512")
    assert answer.headers["x-imagegate-model"] == "remote" and answer.headers["x-imagegate-provider"] == "up"
    charged = round(0.262144 * 0.02 * 1_000_000)
    assert balance(secured, key) == 5_000_000 - charged


def test_open_webui_without_auth_sends_an_empty_authorization(gw: Gateway) -> None:
    answer = gw.http.post("/sdapi/v1/txt2img", headers={"authorization": ""},
                          json={"prompt": "x", "batch_size": 1, "width": 64, "height": 64})
    assert answer.status_code == 200, answer.text


# -- money, keys, limits ------------------------------------------------------------------------

def test_basic_auth_with_the_key_as_password_and_bearer(secured: Gateway) -> None:
    key, _ = make_key(secured)
    assert client(secured, key).txt2img(prompt="p", width=64, height=64).images
    bearer = secured.http.post("/sdapi/v1/txt2img", json={"prompt": "p", "width": 64, "height": 64},
                               headers={"authorization": f"Bearer {key}"})
    assert bearer.status_code == 200
    for headers in ({}, basic("ig_not_a_real_key"), {"authorization": "Basic !!!"}):
        refused = secured.http.post("/sdapi/v1/txt2img", json={"prompt": "p"}, headers=headers)
        assert refused.status_code == 401 and refused.json()["error"] == "invalid_api_key"
        assert refused.headers["www-authenticate"].startswith("Basic") and key not in refused.text
    with pytest.raises(RuntimeError) as info:
        client(secured, "ig_wrong").txt2img(prompt="p")
    assert info.value.args[0] == 401


def test_credit_is_held_and_captured_as_delivered(secured: Gateway) -> None:
    key, _ = make_key(secured, credits="1.00")
    result = client(secured, key).txt2img(prompt="p", width=256, height=256, batch_size=2)
    cost = round(256 * 256 * 2 / 1e6 * 0.0015 * 1_000_000)
    assert balance(secured, key) == 1_000_000 - cost
    billing = result.info["imagegate"]["billing"]
    assert billing["held"] == billing["charged"] == cost / 1e6 and billing["refunded"] == 0


def test_refusals_keep_a1111_shapes_and_the_v1_statuses(secured: Gateway, fake_openai: FakeOpenAI) -> None:
    poor, _ = make_key(secured, credits="0.000001")
    answer = secured.http.post("/sdapi/v1/txt2img", json={"prompt": "p", "width": 512, "height": 512},
                               headers=basic(poor))
    assert answer.status_code == 402 and answer.json()["error"] == "insufficient_quota"
    limited, _ = make_key(secured, models=["demo"])
    answer = secured.http.post("/sdapi/v1/txt2img", json={"prompt": "p", "model": "remote"}, headers=basic(limited))
    assert answer.status_code == 403 and answer.json()["error"] == "model_not_allowed"
    slow, _ = make_key(secured, rpm=1)
    assert secured.http.post("/sdapi/v1/txt2img", json={"prompt": "p", "width": 64, "height": 64},
                             headers=basic(slow)).status_code == 200
    answer = secured.http.post("/sdapi/v1/txt2img", json={"prompt": "p"}, headers=basic(slow))
    assert answer.status_code == 429 and int(answer.headers["retry-after"]) >= 1
    assert set(answer.json()) == {"error", "detail", "body", "errors"}
    assert fake_openai.requests == []
    fake_openai.behave(fail_status=503)
    answer = secured.http.post("/sdapi/v1/txt2img", json={"prompt": "p", "model": "remote"}, headers=basic(poor))
    assert answer.status_code == 402  # the hold is checked before any upstream call
    rich, _ = make_key(secured, credits="1.00")
    answer = secured.http.post("/sdapi/v1/txt2img", json={"prompt": "p", "model": "remote", "width": 256,
                                                          "height": 256}, headers=basic(rich))
    assert answer.status_code in (502, 503) and "error" in answer.json() and UPSTREAM_KEY not in answer.text
    assert balance(secured, rich) == 1_000_000  # released in full


BAD_TXT2IMG = [
    ({"prompt": "p", "bogus_field": 1}, "bogus_field"),
    ({"prompt": "p", "enable_hr": True, "hr_upscaler": "Latent"}, "enable_hr"),
    ({"prompt": "p", "alwayson_scripts": {"ControlNet": {"args": [{"enabled": True}]}}}, "alwayson_scripts"),
    ({"prompt": "p", "script_name": "x/y/z plot"}, "script_name"),
    ({"prompt": "p", "restore_faces": True}, "restore_faces"),
    ({"prompt": "p", "styles": ["cinematic"]}, "styles"),
    ({"prompt": "p", "width": 100, "height": 64}, "width"),
    ({"prompt": "p", "width": 64}, "height"),
    ({"prompt": "p", "batch_size": 3, "n_iter": 2}, "batch_size"),
    ({"prompt": "p", "seed": 2**32}, "seed"),
    ({"prompt": "p", "steps": "many"}, "steps"),
    ({"prompt": "   "}, "prompt"),
]


@pytest.mark.parametrize(("body", "field"), BAD_TXT2IMG)
def test_bad_txt2img_is_a_422_naming_the_field_and_costs_nothing(secured: Gateway, fake_openai: FakeOpenAI,
                                                                 body: dict[str, Any], field: str) -> None:
    key, _ = make_key(secured, credits="1.00")
    answer = secured.http.post("/sdapi/v1/txt2img", json={"model": "remote", **body}, headers=basic(key))
    assert answer.status_code == 422, answer.text
    [detail] = answer.json()["detail"]
    assert detail["loc"] == ["body", field] and detail["msg"]
    assert fake_openai.requests == [] and balance(secured, key) == 1_000_000


BAD_IMG2IMG = [
    ({"prompt": "p"}, "init_images"),
    ({"prompt": "p", "init_images": ["%%% not base64"]}, "init_images[0]"),
    ({"prompt": "p", "init_images": [base64.b64encode(b"not an image").decode()]}, "init_images[0]"),
    ({"prompt": "p", "init_images": ["GOOD"], "mask": "%%%"}, "mask"),
    ({"prompt": "p", "init_images": ["GOOD"], "inpainting_mask_invert": 2}, "inpainting_mask_invert"),
]


@pytest.mark.parametrize(("body", "field"), BAD_IMG2IMG)
def test_bad_img2img_is_a_422_and_calls_no_upstream(gw: Gateway, fake_a1111: FakeA1111, body: dict[str, Any],
                                                     field: str) -> None:
    good = base64.b64encode(png_of(Image.new("RGB", (64, 64)))).decode()
    body = {**body, "init_images": [good if i == "GOOD" else i for i in body.get("init_images", [])] or None,
            "model": "sdxl"}
    answer = gw.http.post("/sdapi/v1/img2img", json={k: v for k, v in body.items() if v is not None})
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["loc"] == ["body", field]
    assert fake_a1111.generations == []


# -- progress and interrupt --------------------------------------------------------------------

def test_interrupt_stops_only_the_callers_own_job_and_refunds_it(secured: Gateway, fake_openai: FakeOpenAI) -> None:
    mine, _ = make_key(secured, credits="1.00")
    other, _ = make_key(secured)
    fake_openai.behave(delay_s=20)
    api = client(secured, mine)
    with concurrent.futures.ThreadPoolExecutor() as pool:
        running = pool.submit(api.txt2img, prompt="slow", width=256, height=256,
                              override_settings={"sd_model_checkpoint": "remote"})
        deadline = time.monotonic() + 10
        while api.get_progress()["state"]["job_count"] != 1:
            assert time.monotonic() < deadline and not running.done(), "the job never showed in /progress"
            time.sleep(0.02)
        progress = api.get_progress()
        assert progress["state"]["job"] == "remote" and progress["state"]["interrupted"] is False
        assert client(secured, other).get_progress()["state"]["job_count"] == 0  # not another key's
        client(secured, other).interrupt()  # interrupts nothing of ours
        assert not running.done()
        started = time.monotonic()
        api.interrupt()
        result = running.result(timeout=10)
    assert time.monotonic() - started < 5 and result.images == [] and result.info["interrupted"] is True
    assert balance(secured, mine) == 1_000_000  # released in full
    assert api.get_progress()["state"]["job_count"] == 0


def test_progress_counts_steps_as_the_backend_reports_them(gw: Gateway) -> None:
    # The demo backend reports one step per image; when done, no job is left.
    result = client(gw).txt2img(prompt="p", width=64, height=64, batch_size=3)
    assert len(result.images) == 3
    progress = client(gw).get_progress()
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0 and progress["current_image"] is None


# -- the rest of what /v1 has ---------------------------------------------------------------------

def test_idempotency_key_replays_and_charges_once(secured: Gateway, fake_openai: FakeOpenAI) -> None:
    key, _ = make_key(secured, credits="1.00")
    headers = {**basic(key), "idempotency-key": "a1111-once"}
    body = {"prompt": "p", "model": "remote", "width": 256, "height": 256, "seed": 9}
    first = secured.http.post("/sdapi/v1/txt2img", json=body, headers=headers)
    again = secured.http.post("/sdapi/v1/txt2img", json=body, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.headers["idempotency-replayed"] == "true" and again.content == first.content
    assert len(fake_openai.requests) == 1
    assert balance(secured, key) == 1_000_000 - round(0.065536 * 0.02 * 1_000_000)


def test_headers_and_metrics_as_on_v1(gw: Gateway) -> None:
    answer = gw.http.post("/sdapi/v1/txt2img", json={"prompt": "p", "width": 64, "height": 64},
                          headers={"x-request-id": "a1111-req-1"})
    assert answer.headers["x-request-id"] == "a1111-req-1"
    assert answer.headers["x-imagegate-model"] == "demo" and float(answer.headers["x-imagegate-cost"]) > 0
    gw.http.post("/v2/automatic1111/sdapi/v1/txt2img", json={"prompt": "p", "width": 64, "height": 64})
    metrics = gw.http.get("/metrics").text
    assert 'imagegate_requests_total{endpoint="/sdapi/v1/txt2img",model="demo",status="200"} 1.0' in metrics
    assert 'endpoint="/v2/automatic1111/sdapi/v1/txt2img",model="demo",status="200"} 1.0' in metrics


def test_seed_004_path_serves_the_same_surface(gw: Gateway, fake_a1111: FakeA1111) -> None:
    result = client(gw, prefix="/v2/automatic1111").txt2img(prompt="p", seed=11, width=64, height=64,
                                                            override_settings={"sd_model_checkpoint": "sdxl"})
    assert result.info["all_seeds"] == [11] and fake_a1111.last.json["seed"] == 11


def test_the_surface_can_be_turned_off(tmp_path: Path, fake_openai: FakeOpenAI, fake_a1111: FakeA1111) -> None:
    cfg = surface_config(tmp_path, fake_openai.base_url, fake_a1111.url)
    cfg["surfaces"] = {"a1111": False}
    with serve_gateway(cfg) as off:
        assert off.http.post("/sdapi/v1/txt2img", json={"prompt": "p"}).status_code == 404
        assert off.http.get("/v1/models").status_code == 200
