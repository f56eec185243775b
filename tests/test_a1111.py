"""The `a1111` adapter through a live gateway: what it sends to `/sdapi/v1`, and how it survives misbehaviour.

The official `openai` SDK talks to the gateway; its provider `sd` points at FakeA1111 (a real HTTP server
on 127.0.0.1 with `--api-auth`-style HTTP Basic, recording every request).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from PIL import Image

from imagegate.providers.a1111 import A1111Options, A1111Provider
from imagegate.providers.base import ImageRequest, InputImage
from tests.conftest import (
    NO_BREAKER,
    PIL_FORMAT,
    Gateway,
    StartGateway,
    b64,
    base_config,
    decode,
    expect_error,
    png_bytes,
    sdk,
    serve_gateway,
)
from tests.fakes.a1111_upstream import OOM, PAINT, FakeA1111, seed_color

USER, PASSWORD = "gate", "a1111-pass-secret-77"
HIDDEN = (PASSWORD, "Traceback")  # what no error the gateway answers may show
SDXL = "sd_xl_base_1.0"
SD15 = "sd15/v1-5-pruned-emaonly.safetensors [6ce0161689]"
LIMITS = {"min_side": 64, "max_side": 2048, "multiple_of": 8, "max_n": 4}


def a1111_config(tmp_path: Path, url: str, **provider: Any) -> dict[str, Any]:
    cfg = base_config(tmp_path)
    cfg["providers"]["sd"] = {"type": "a1111", "base_url": url, "username": USER, "password": PASSWORD,
                              "sampler": "Euler a", "steps": 25, "cfg_scale": 6.0, "timeout_s": 10,
                              "params": {"restore_faces": False}, **NO_BREAKER, **provider}
    cfg["models"].update({
        "sdxl": {"limits": LIMITS, "default_size": "512x512",
                 "defaults": {"steps": 28, "guidance_scale": 6.5, "negative_prompt": "lowres"},
                 "routes": [{"provider": "sd", "model": SDXL, "sampler": "DPM++ 2M", "scheduler": "Karras"}]},
        "sd15": {"limits": LIMITS, "default_size": "512x512", "routes": [{"provider": "sd", "model": SD15}]},
        "open": {"limits": LIMITS, "default_size": "256x256", "allow_extra_fields": True,
                 "routes": [{"provider": "sd", "model": SDXL, "params": {"enable_hr": False, "tiling": False},
                             "override_settings": {"sd_vae": "sdxl_vae.safetensors"}}]},
        "loose": {"limits": {**LIMITS, "multiple_of": 4}, "routes": [{"provider": "sd", "model": SDXL}]},
        "ghost": {"limits": LIMITS, "routes": [{"provider": "sd", "model": "no-such-model"}]},
        "typo": {"limits": LIMITS, "routes": [{"provider": "sd", "model": SDXL, "sampler": "DPM 2M"}]},
        "misrouted": {"limits": LIMITS, "routes": [{"provider": "sd", "model": SDXL, "params": {"n_iter": 4}}]},
    })
    return cfg


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeA1111]:
    with FakeA1111(USER, PASSWORD) as server:
        yield server


@pytest.fixture(scope="module")
def gw(fake: FakeA1111, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with serve_gateway(a1111_config(tmp_path_factory.mktemp("a1111"), fake.url)) as gateway:
        yield gateway


@pytest.fixture(autouse=True)
def clean_fake(fake: FakeA1111) -> None:
    fake.reset()


def generate_error(gw: Gateway, status: int, **kwargs: Any) -> openai.APIStatusError:
    call = {"model": "sdxl", "prompt": "a lighthouse", "size": "256x256", **kwargs}
    return expect_error(lambda: sdk(gw).images.generate(**call), status, *HIDDEN)


# -- txt2img: the payload, field by field ----------------------------------------------------------

def test_generation_is_translated_field_by_field(gw: Gateway, fake: FakeA1111) -> None:
    resp = sdk(gw).images.with_raw_response.generate(
        model="sdxl", prompt="a lighthouse at dusk", n=2, size="512x384",
        extra_body={"seed": 1234, "negative_prompt": "blurry, text"})
    sent = fake.last
    task = sent.json.pop("force_task_id")
    assert task.startswith("imagegate-")
    assert sent.json == {
        "prompt": "a lighthouse at dusk", "negative_prompt": "blurry, text", "steps": 28, "cfg_scale": 6.5,
        "sampler_name": "DPM++ 2M", "scheduler": "Karras", "restore_faces": False,
        "width": 512, "height": 384, "seed": 1234, "batch_size": 2, "n_iter": 1,
        "override_settings": {"sd_model_checkpoint": SDXL}, "override_settings_restore_afterwards": False,
        "send_images": True, "save_images": False,
    }
    expected_auth = "Basic " + b64(f"{USER}:{PASSWORD}".encode())
    assert all(r.headers["authorization"] == expected_auth for r in fake.requests)
    assert not any("test-key" in v for v in sent.headers.values())
    assert resp.headers["x-imagegate-provider"] == "sd"
    data = resp.parse().data
    assert [item.seed for item in data] == [1234, 1235]  # type: ignore[attr-defined]
    for i, item in enumerate(data):
        img = decode(item.b64_json)
        assert (img.format, img.size) == ("PNG", (512, 384))
        assert img.convert("RGB").getpixel((5, 5)) == seed_color(1234 + i)


def test_provider_defaults_fill_what_the_request_and_model_leave_open(gw: Gateway, fake: FakeA1111) -> None:
    resp = sdk(gw).images.generate(model="sd15", prompt="p")
    sent = fake.last.json
    seed = resp.data[0].seed  # type: ignore[attr-defined]
    # No model defaults: steps, cfg and the sampler come from the provider's options; no scheduler configured.
    assert {k: sent.get(k) for k in ("steps", "cfg_scale", "sampler_name", "negative_prompt", "seed")} == {
        "steps": 25, "cfg_scale": 6.0, "sampler_name": "Euler a", "negative_prompt": "", "seed": seed}
    assert "scheduler" not in sent
    assert sent["override_settings"] == {"sd_model_checkpoint": SD15}
    assert (sent["width"], sent["height"], sent["batch_size"]) == (512, 512, 1)


def test_extra_fields_and_route_params_are_merged(gw: Gateway, fake: FakeA1111) -> None:
    sdk(gw).images.generate(model="open", prompt="p", extra_body={
        "enable_hr": True, "hr_scale": 1.5, "sampler_name": "Euler",
        "override_settings": {"CLIP_stop_at_last_layers": 2}})
    sent = fake.last.json
    # client extras > route params > provider params > computed fields
    assert {k: sent[k] for k in ("enable_hr", "hr_scale", "tiling", "restore_faces", "sampler_name")} == {
        "enable_hr": True, "hr_scale": 1.5, "tiling": False, "restore_faces": False, "sampler_name": "Euler"}
    assert sent["override_settings"] == {"sd_vae": "sdxl_vae.safetensors", "CLIP_stop_at_last_layers": 2,
                                         "sd_model_checkpoint": SDXL}


@pytest.mark.parametrize("extra", [{"batch_size": 8}, {"send_images": False},
                                   {"override_settings": {"sd_model_checkpoint": "other"}}])
def test_extras_the_gateway_owns_are_refused_before_any_call(gw: Gateway, fake: FakeA1111,
                                                             extra: dict[str, Any]) -> None:
    err = generate_error(gw, 400, model="open", extra_body=extra)
    assert err.code == "unsupported_by_upstream"
    assert fake.requests == []


def test_size_not_a_multiple_of_8_is_400_without_an_upstream_call(gw: Gateway, fake: FakeA1111) -> None:
    err = generate_error(gw, 400, model="loose", size="260x260")
    assert err.code == "unsupported_by_upstream" and "multiple of 8" in err.message
    assert fake.requests == []
    assert sdk(gw).images.generate(model="loose", prompt="p", size="264x256").data  # the model's limit alone is 4


@pytest.mark.parametrize(("fmt", "size"), [("jpeg", "320x256"), ("webp", "256x320")])
def test_output_format_is_converted(gw: Gateway, fmt: str, size: str) -> None:
    resp = sdk(gw).images.generate(model="sdxl", prompt="p", size=size, output_format=fmt)  # type: ignore[arg-type]
    img = decode(resp.data[0].b64_json)
    assert (img.format, f"{img.width}x{img.height}") == (PIL_FORMAT[fmt], size)


def test_url_response_is_a_gateway_artifact(gw: Gateway) -> None:
    resp = sdk(gw).images.generate(model="sdxl", prompt="p", size="256x256", response_format="url")
    url = resp.data[0].url
    assert url is not None and url.startswith(f"{gw.url}/v1/artifacts/")
    got = gw.http.get(url.removeprefix(gw.url))
    assert got.status_code == 200 and Image.open(io.BytesIO(got.content)).size == (256, 256)


def test_grid_and_extension_images_are_sliced_off(gw: Gateway, fake: FakeA1111) -> None:
    fake.behave(grid=True, extra_images=2)
    data = sdk(gw).images.generate(model="sdxl", prompt="p", size="256x192", n=3, extra_body={"seed": 40}).data
    assert [item.seed for item in data] == [40, 41, 42]  # type: ignore[attr-defined]
    imgs = [decode(item.b64_json).convert("RGB") for item in data]
    assert [(img.size, img.getpixel((0, 0))) for img in imgs] == [((256, 192), seed_color(40 + i)) for i in range(3)]


# -- img2img and inpainting ------------------------------------------------------------------------

def test_edit_is_img2img_with_the_default_strength(gw: Gateway, fake: FakeA1111) -> None:
    src = png_bytes(256, 256, (200, 10, 10))
    resp = sdk(gw).images.edit(model="sdxl", image=("src.png", src, "image/png"), prompt="make it dusk",
                               extra_body={"seed": 7})
    sent = fake.last
    assert sent.path == "/sdapi/v1/img2img"
    assert sent.json["init_images"] == [b64(src)]
    assert (sent.json["denoising_strength"], sent.json["resize_mode"]) == (0.75, 0)
    assert (sent.json["width"], sent.json["height"], sent.json["seed"]) == (256, 256, 7)
    assert sent.json["override_settings"] == {"sd_model_checkpoint": SDXL}
    assert not {"mask", "inpainting_fill", "mask_blur"} & sent.json.keys()
    img = decode(resp.data[0].b64_json)
    assert (img.size, img.convert("RGB").getpixel((128, 128))) == ((256, 256), (200, 10, 10))


def test_edit_strength_steps_and_guidance_from_the_client(gw: Gateway, fake: FakeA1111) -> None:
    sdk(gw).images.edit(model="sdxl", image=("src.png", png_bytes(256, 256), "image/png"), prompt="x",
                        size="512x512", extra_body={"strength": 0.35, "steps": 12, "guidance_scale": 3.5})
    sent = fake.last.json
    assert (sent["denoising_strength"], sent["steps"], sent["cfg_scale"]) == (0.35, 12, 3.5)
    assert (sent["width"], sent["height"]) == (512, 512)


def test_inpainting_mask_is_white_where_the_client_mask_was_transparent(gw: Gateway, fake: FakeA1111) -> None:
    src = png_bytes(128, 128, (10, 200, 10))
    mask = Image.new("RGBA", (128, 128), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (32, 48, 96, 80))  # the region to edit
    buf = io.BytesIO()
    mask.save(buf, "PNG")
    resp = sdk(gw).images.edit(model="sdxl", image=("src.png", src, "image/png"),
                               mask=("mask.png", buf.getvalue(), "image/png"), prompt="a red door")
    sent = fake.last.json
    assert {k: sent[k] for k in ("inpainting_fill", "inpaint_full_res", "inpainting_mask_invert", "mask_blur")} == {
        "inpainting_fill": 1, "inpaint_full_res": False, "inpainting_mask_invert": 0, "mask_blur": 4}
    sent_mask = decode(sent["mask"])
    assert sent_mask.mode == "L" and sent_mask.size == (128, 128)
    expected = Image.new("L", (128, 128), 0)
    expected.paste(255, (32, 48, 96, 80))
    assert sent_mask.tobytes() == expected.tobytes()
    out = decode(resp.data[0].b64_json).convert("RGB")
    assert out.getpixel((40, 60)) == PAINT and out.getpixel((100, 100)) == (10, 200, 10)
    assert out.getpixel((31, 60)) == (10, 200, 10) and out.getpixel((95, 79)) == PAINT


def test_several_input_images_are_refused_without_a_call(gw: Gateway, fake: FakeA1111) -> None:
    images = [("a.png", png_bytes(128, 128), "image/png"), ("b.png", png_bytes(128, 128), "image/png")]
    expect_error(lambda: sdk(gw).images.edit(model="sdxl", image=images, prompt="merge"), 400, *HIDDEN)
    assert fake.requests == []


def test_unsupported_names_the_reason() -> None:
    provider = A1111Provider("sd", A1111Options(type="a1111"))
    image = InputImage(png_bytes(64, 64), "png", 64, 64)
    request = ImageRequest(operation="edit", prompt="p", upstream_model=SDXL, width=64, height=64, n=1, seed=1,
                           images=[image, image])
    assert "one init image" in (provider.unsupported(request) or "")
    request.images = [image]
    assert provider.unsupported(request) is None
    request.width = 68
    assert "multiple of 8" in (provider.unsupported(request) or "")


# -- auth --------------------------------------------------------------------------------------------

def test_wrong_password_is_502_auth_failed_without_the_password(
        tmp_path: Path, fake: FakeA1111, start_gateway: StartGateway) -> None:
    wrong = "wrong-password-4242"
    gw = start_gateway(a1111_config(tmp_path, fake.url, password=wrong))
    err = generate_error(gw, 502)
    assert err.code == "upstream_auth_failed"
    assert wrong not in err.response.text
    assert fake.generations == []  # refused at the first (discovery) call
    assert fake.requests[0].headers["authorization"] == "Basic " + b64(f"{USER}:{wrong}".encode())


def test_server_without_auth_gets_no_authorization_header(tmp_path: Path, start_gateway: StartGateway) -> None:
    with FakeA1111() as open_fake:
        cfg = a1111_config(tmp_path, open_fake.url, username="", password="")
        sdk(start_gateway(cfg)).images.generate(model="sdxl", prompt="p", size="256x256")
        assert len(open_fake.generations) == 1
        assert all("authorization" not in r.headers for r in open_fake.requests)


def test_half_a_credential_disables_the_provider(tmp_path: Path, fake: FakeA1111,
                                                 start_gateway: StartGateway) -> None:
    gw = start_gateway(a1111_config(tmp_path, fake.url, password=""))
    assert gw.http.get("/readyz").json()["disabled_providers"] == {"sd": "missing password"}
    assert generate_error(gw, 503).code == "no_healthy_route"


# -- names A1111 would silently replace -----------------------------------------------------------------

def test_unknown_checkpoint_is_502_not_found_without_generating(gw: Gateway, fake: FakeA1111) -> None:
    err = generate_error(gw, 502, model="ghost")
    assert err.code == "upstream_not_found" and "no-such-model" in err.message
    assert fake.generations == []


def test_unknown_sampler_is_502_not_found_without_generating(gw: Gateway, fake: FakeA1111) -> None:
    err = generate_error(gw, 502, model="typo")
    assert err.code == "upstream_not_found" and "DPM 2M" in err.message
    assert fake.generations == []


def test_names_are_fetched_once(tmp_path: Path, fake: FakeA1111, start_gateway: StartGateway) -> None:
    gw = start_gateway(a1111_config(tmp_path, fake.url))
    for _ in range(2):
        sdk(gw).images.generate(model="sdxl", prompt="p", size="256x256")
    assert [r.path for r in fake.requests] == ["/sdapi/v1/sd-models", "/sdapi/v1/samplers", "/sdapi/v1/txt2img",
                                               "/sdapi/v1/txt2img"]


@pytest.mark.parametrize(("status", "asked_again"), [(500, True), (404, False)])
def test_names_unavailable_skip_the_check(tmp_path: Path, fake: FakeA1111, start_gateway: StartGateway,
                                          status: int, asked_again: bool) -> None:
    gw = start_gateway(a1111_config(tmp_path, fake.url))
    fake.behave(discovery_status=status)
    for model in ("ghost", "sdxl"):  # unchecked: the unknown checkpoint goes through, as A1111 would take it
        sdk(gw).images.generate(model=model, prompt="p", size="256x256")
    discovery = [r.path for r in fake.requests if r.path.endswith(("/sd-models", "/samplers"))]
    assert len(discovery) == (4 if asked_again else 2)
    assert len(fake.generations) == 2


def test_invalid_route_option_is_502_misconfigured(gw: Gateway, fake: FakeA1111) -> None:
    err = generate_error(gw, 502, model="misrouted")
    assert err.code == "upstream_misconfigured" and "n_iter" in err.message
    assert fake.requests == []


# -- misbehaviour: clean errors, never a 500, a hang, or the password ------------------------------------

@pytest.mark.parametrize(("mode", "code"), [
    ("garbage", "upstream_bad_response"),
    ("info_not_json", "upstream_bad_response"),
    ("no_images", "upstream_bad_response"),
    ("no_info", "upstream_bad_response"),
    ("few_images", "upstream_bad_response"),
    ("bad_base64", "upstream_bad_response"),
    ("not_image", "upstream_bad_image"),
])
def test_bad_answer_is_502(gw: Gateway, fake: FakeA1111, mode: str, code: str) -> None:
    fake.behave(mode=mode)
    assert generate_error(gw, 502, n=2).code == code
    assert len(fake.generations) == 1


SDNEXT_500 = {"error": "RuntimeError", "detail": "", "body": "", "code": 500,
              "errors": f"auth {USER}:{PASSWORD} failed\n  at  load"}
BAD_INIT = {"error": "HTTPException", "detail": "Invalid encoded image", "body": "",
            "errors": "500: Invalid encoded image"}
NO_SCRIPT = {"error": "HTTPException", "detail": "always on script controlnet not found", "body": "",
             "errors": "422: always on script controlnet not found"}


@pytest.mark.parametrize(("fail_status", "body", "status", "code", "text"), [
    (500, None, 502, "upstream_error", OOM.split(" (")[0]),
    (500, SDNEXT_500, 502, "upstream_error", "auth gate:*** failed at load"),  # cleaned and redacted
    (500, BAD_INIT, 502, "upstream_error", "Invalid encoded image"),
    (422, None, 400, "upstream_rejected", "width: value is not a valid integer"),  # FastAPI's own 422
    (422, NO_SCRIPT, 400, "upstream_rejected", "always on script controlnet not found"),
])
def test_error_bodies_are_mapped_and_cleaned(gw: Gateway, fake: FakeA1111, fail_status: int,
                                             body: dict[str, Any] | None, status: int, code: str, text: str) -> None:
    fake.behave(fail_status=fail_status, error_body=body)
    err = generate_error(gw, status)  # asserts the password is absent
    assert err.code == code and text in err.message
    assert '"body"' not in err.response.text
    if body is None and fail_status == 422:
        assert err.param == "width"


def test_rate_limit_is_429_with_retry_after(gw: Gateway, fake: FakeA1111) -> None:
    fake.behave(fail_status=429, retry_after="7")
    err = generate_error(gw, 429)
    assert err.code == "upstream_rate_limited" and err.response.headers["retry-after"] == "7"


def test_extra_field_of_the_wrong_type_is_rejected_upstream_as_400(gw: Gateway, fake: FakeA1111) -> None:
    err = generate_error(gw, 400, model="open", extra_body={"hr_scale": "big"})
    assert (err.code, err.param) == ("upstream_rejected", "hr_scale")
    assert len(fake.generations) == 1


def test_slow_upstream_past_the_deadline_is_504_and_our_job_is_interrupted(
        tmp_path: Path, fake: FakeA1111, start_gateway: StartGateway) -> None:
    cfg = a1111_config(tmp_path, fake.url)
    cfg["server"]["request_timeout_s"] = 1
    gw = start_gateway(cfg)
    fake.behave(delay_s=5)
    err = generate_error(gw, 504)
    assert err.code == "deadline_exceeded"
    assert fake.interrupted == [fake.last.json["force_task_id"]]
    assert [r.path for r in fake.requests[-2:]] == ["/internal/progress", "/sdapi/v1/interrupt"]
    fake.behave()
    assert sdk(gw).images.generate(model="sdxl", prompt="p", size="256x256").data[0].b64_json
