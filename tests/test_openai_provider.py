"""The `openai` adapter through a live gateway: what it sends upstream, and how it survives misbehaviour.

The official `openai` SDK talks to the gateway; model `remote` routes to FakeOpenAI (a real HTTP server
on 127.0.0.1 that records every request), whose own model name is `upstream-model-x`.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from tests.conftest import (
    PIL_FORMAT,
    UPSTREAM_KEY,
    Gateway,
    StartGateway,
    base_config,
    decode,
    expect_error,
    free_port,
    png_bytes,
    sdk,
)
from tests.fakes.openai_upstream import FakeOpenAI

CLIENT_KEY = "test-key"  # what conftest's clients send; it must never travel upstream
HIDDEN = (UPSTREAM_KEY, "Traceback")  # what no error the gateway answers may show


# -- helpers -------------------------------------------------------------------------------------

def remote_config(tmp_path: Path, upstream_url: str, **model: Any) -> dict[str, Any]:
    """conftest's configuration with the `remote` model's entry updated by `model`."""
    cfg = base_config(tmp_path, upstream_url)
    cfg["models"]["remote"].update(model)
    return cfg


def generate_error(gw: Gateway, status: int, **kwargs: Any) -> openai.APIStatusError:
    """Call generate on `remote`, expect an OpenAI-shaped error with `status` that leaks no upstream secret."""
    call: dict[str, Any] = {"model": "remote", "prompt": "a lighthouse", "size": "256x256", **kwargs}
    return expect_error(lambda: sdk(gw).images.generate(**call), status, *HIDDEN)


def edit_error(gw: Gateway, status: int) -> openai.APIStatusError:
    image = ("src.png", png_bytes(256, 256), "image/png")
    return expect_error(lambda: sdk(gw).images.edit(model="remote", image=image, prompt="x"), status, *HIDDEN)


@pytest.fixture
def second_fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(UPSTREAM_KEY) as fake:
        yield fake


# -- generations: the JSON request, field by field -----------------------------------------------

def test_generation_request_is_translated_field_by_field(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    resp = sdk(gateway).images.with_raw_response.generate(
        model="remote", prompt="a lighthouse at dusk", n=2, size="512x256", output_format="webp",
        quality="high", background="opaque", user="user-42",
        extra_body={"seed": 1234, "negative_prompt": "blurry, text"})
    assert len(fake_openai.requests) == 1
    sent = fake_openai.last
    assert sent.path == "/v1/images/generations"
    assert sent.json == {
        "model": "upstream-model-x", "prompt": "a lighthouse at dusk", "n": 2, "size": "512x256",
        "output_format": "webp", "quality": "high", "background": "opaque", "user": "user-42",
        "seed": 1234, "steps": 30, "guidance_scale": 6.5, "negative_prompt": "blurry, text",
    }
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert not any(CLIENT_KEY in value for value in sent.headers.values())
    assert resp.headers["x-imagegate-model"] == "remote"
    assert resp.headers["x-imagegate-provider"] == "up"
    parsed = resp.parse()
    assert [item.seed for item in parsed.data] == [1234, 1235]  # type: ignore[attr-defined]
    assert [decode(item.b64_json).format for item in parsed.data] == ["WEBP", "WEBP"]


def test_minimal_generation_sends_model_defaults_and_the_seed_it_reports(
        gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    resp = sdk(gateway).images.generate(model="remote", prompt="p", response_format="url")
    sent = fake_openai.last.json
    assert sent is not None
    seed = resp.data[0].seed  # type: ignore[attr-defined]
    assert isinstance(seed, int) and 0 <= seed < 2**32
    # No quality/background/user given: none sent. The client's response_format is ours, never forwarded.
    assert sent == {"model": "upstream-model-x", "prompt": "p", "n": 1, "size": "1024x1024",
                    "output_format": "png", "seed": seed, "steps": 30, "guidance_scale": 6.5}


def test_an_upstream_cookie_is_never_sent_back(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    # One provider serves every caller: what an upstream sets on one call must not ride on the next.
    fake_openai.cookie = "__cf_bm=from-the-first-call; path=/; HttpOnly"
    for _ in range(2):
        sdk(gateway).images.generate(model="remote", prompt="p", size="256x256")
    first, second = fake_openai.requests[-2:]
    assert "cookie" not in first.headers and "cookie" not in second.headers


@pytest.mark.parametrize(("extra", "expected"), [
    ({"steps": 500}, {"steps": 60}),                      # clamped to 1..60
    ({"steps": 0}, {"steps": 1}),
    ({"steps": 12, "guidance_scale": 3.0}, {"steps": 12, "guidance_scale": 3.0}),
    ({"seed": 0}, {"seed": 0}),
    ({"seed": 2**32 - 1}, {"seed": 2**32 - 1}),
    ({"safety_identifier": "hash-1", "moderation": "low"}, {"safety_identifier": "hash-1", "moderation": "low"}),
])
def test_tuning_fields_reach_the_upstream(gateway: Gateway, fake_openai: FakeOpenAI, extra: dict[str, Any],
                                          expected: dict[str, Any]) -> None:
    sdk(gateway).images.generate(model="remote", prompt="p", size="256x256", extra_body=extra)
    sent = fake_openai.last.json
    assert sent is not None
    assert {k: sent.get(k) for k in expected} == expected


def test_quality_preset_from_config_sets_steps(tmp_path: Path, fake_openai: FakeOpenAI,
                                               start_gateway: StartGateway) -> None:
    gw = start_gateway(remote_config(tmp_path, fake_openai.base_url,
                                     quality={"low": {"steps": 8}, "high": {"steps": 44, "guidance_scale": 9.0}}))
    sdk(gw).images.generate(model="remote", prompt="p", size="256x256", quality="low")
    assert fake_openai.last.json is not None
    assert (fake_openai.last.json["steps"], fake_openai.last.json["guidance_scale"]) == (8, 6.5)
    sdk(gw).images.generate(model="remote", prompt="p", size="256x256", quality="high")
    assert fake_openai.last.json is not None
    assert (fake_openai.last.json["steps"], fake_openai.last.json["guidance_scale"]) == (44, 9.0)
    assert fake_openai.last.json["quality"] == "high"


def test_extension_fields_pass_through_only_where_the_model_allows(
        tmp_path: Path, fake_openai: FakeOpenAI, gateway: Gateway, start_gateway: StartGateway) -> None:
    extra = {"lora": "pixel-art", "cfg_rescale": 0.7, "tags": ["a", "b"]}
    refused = generate_error(gateway, 400, extra_body=extra)
    assert refused.param == "cfg_rescale"
    assert fake_openai.requests == []  # validated before any upstream call
    open_gw = start_gateway(remote_config(tmp_path, fake_openai.base_url, allow_extra_fields=True))
    sdk(open_gw).images.generate(model="remote", prompt="p", size="256x256", extra_body=extra)
    sent = fake_openai.last.json
    assert sent is not None
    assert {k: sent[k] for k in extra} == extra


def test_pass_extensions_false_sends_only_openai_fields(tmp_path: Path, fake_openai: FakeOpenAI,
                                                        start_gateway: StartGateway) -> None:
    cfg = base_config(tmp_path, fake_openai.base_url)
    cfg["providers"]["up"]["pass_extensions"] = False
    gw = start_gateway(cfg)
    sdk(gw).images.generate(model="remote", prompt="p", size="256x256", quality="low",
                            extra_body={"seed": 5, "negative_prompt": "x", "steps": 9})
    assert fake_openai.last.json == {"model": "upstream-model-x", "prompt": "p", "n": 1, "size": "256x256",
                                     "output_format": "png", "quality": "low"}


@pytest.mark.parametrize(("size", "fmt"), [("512x256", "png"), ("256x512", "jpeg"), ("1024x1024", "webp"),
                                           ("1536x768", "png")])
def test_images_are_real_and_of_the_asked_size_and_format(gateway: Gateway, size: str, fmt: str) -> None:
    resp = sdk(gateway).images.generate(model="remote", prompt="p", size=size, n=2,  # type: ignore[arg-type]
                                        output_format=fmt)  # type: ignore[arg-type]
    width, height = (int(v) for v in size.split("x"))
    assert len(resp.data) == 2
    for item in resp.data:
        img = decode(item.b64_json)
        assert (img.format, img.size) == (PIL_FORMAT[fmt], (width, height))
    assert (resp.size, resp.output_format) == (size, fmt)


# -- edits: multipart ----------------------------------------------------------------------------

def test_edit_single_image_is_sent_as_image_with_text_fields(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    src = png_bytes(256, 256, (200, 10, 10))
    resp = sdk(gateway).images.edit(model="remote", image=("src.png", src, "image/png"), prompt="make it blue",
                                    quality="medium", user="u-1", extra_body={"seed": 9, "strength": 0.4})
    sent = fake_openai.last
    assert sent.path == "/v1/images/edits"
    assert sent.headers["content-type"].startswith("multipart/form-data")
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert sent.form == {"model": "upstream-model-x", "prompt": "make it blue", "n": "1", "size": "256x256",
                         "output_format": "png", "quality": "medium", "user": "u-1", "seed": "9", "steps": "30",
                         "guidance_scale": "6.5", "strength": "0.4"}
    assert [(name, data) for name, _, data in sent.files] == [("image", src)]
    img = decode(resp.data[0].b64_json)
    assert (img.format, img.size) == ("PNG", (256, 256))


def test_edit_several_images_and_mask_use_image_brackets(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    first, second = png_bytes(256, 256, (1, 2, 3)), png_bytes(128, 128, (4, 5, 6))
    mask = png_bytes(256, 256, (0, 0, 0, 0), mode="RGBA")
    sdk(gateway).images.edit(model="remote", image=[("a.png", first, "image/png"), ("b.png", second, "image/png")],
                             mask=("m.png", mask, "image/png"), prompt="merge", size="512x512", n=2)
    sent = fake_openai.last
    assert [(name, data) for name, _, data in sent.files] == [("image[]", first), ("image[]", second),
                                                               ("mask", mask)]
    assert (sent.form["size"], sent.form["n"], sent.form["strength"]) == ("512x512", "2", "0.75")


def test_edit_one_element_list_goes_upstream_as_single_image(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    src = png_bytes(256, 256)
    sdk(gateway).images.edit(model="remote", image=[("a.png", src, "image/png")], prompt="x")
    assert [(name, data) for name, _, data in fake_openai.last.files] == [("image", src)]


# -- output handling -----------------------------------------------------------------------------

def test_upstream_url_is_downloaded_at_once_and_returned_as_base64(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    fake_openai.behave(mode="url")
    resp = sdk(gateway).images.with_raw_response.generate(model="remote", prompt="p", size="512x256", n=2)
    assert "/files/" not in resp.text  # the upstream's expiring URL never reaches the client
    items = resp.parse().data
    assert [item.url for item in items] == [None, None]
    assert [decode(item.b64_json).size for item in items] == [(512, 256), (512, 256)]
    assert len(fake_openai.files) == 2


def test_url_response_is_our_artifact_and_outlives_the_upstream_url(gateway: Gateway,
                                                                     fake_openai: FakeOpenAI) -> None:
    fake_openai.behave(mode="url")
    resp = sdk(gateway).images.generate(model="remote", prompt="p", size="256x256", response_format="url")
    url = resp.data[0].url
    assert url is not None and url.startswith(f"{gateway.url}/v1/artifacts/art_")
    fake_openai.files.clear()  # the upstream's URL has expired
    got = gateway.http.get(url.removeprefix(gateway.url))
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(got.content)).size == (256, 256)


# -- misbehaviour: clean errors, never a 500 or a hang, never the secret -------------------------

BAD_ANSWERS = [
    ("foreign_url", "upstream_bad_response"),
    ("garbage", "upstream_bad_response"),
    ("not_image", "upstream_bad_image"),
    ("empty", "upstream_bad_response"),
]


@pytest.mark.parametrize(("mode", "code"), BAD_ANSWERS)
def test_bad_upstream_answer_is_502(gateway: Gateway, fake_openai: FakeOpenAI, mode: str, code: str) -> None:
    fake_openai.behave(mode=mode)
    err = generate_error(gateway, 502)
    assert err.code == code
    assert "evil.invalid" not in err.response.text
    assert len(fake_openai.requests) == 1


@pytest.mark.parametrize(("mode", "code"), BAD_ANSWERS)
def test_bad_upstream_answer_to_an_edit_is_502(gateway: Gateway, fake_openai: FakeOpenAI, mode: str,
                                               code: str) -> None:
    fake_openai.behave(mode=mode)
    assert edit_error(gateway, 502).code == code


def test_several_failing_downloads_are_one_502(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    fake_openai.behave(mode="foreign_url")
    err = generate_error(gateway, 502, n=3)
    assert err.code == "upstream_bad_response"


def test_upstream_400_keeps_message_and_param(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    body = {"error": {"message": "Invalid size for this model.", "type": "invalid_request_error",
                      "param": "size", "code": "invalid_value"}}
    fake_openai.behave(fail_status=400, error_body=body)
    err = generate_error(gateway, 400)
    assert isinstance(err, openai.BadRequestError)
    assert "Invalid size for this model." in err.message
    assert err.param == "size"


def test_upstream_error_message_echoing_the_key_is_redacted(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    body = {"error": {"message": f"Key {UPSTREAM_KEY} may not use size 256x256", "type": "invalid_request_error",
                      "param": None, "code": None}}
    fake_openai.behave(fail_status=400, error_body=body)
    err = generate_error(gateway, 400)  # the helper asserts the key is absent from the body
    assert "may not use size 256x256" in err.message


def test_upstream_moderation_is_content_policy_violation(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    body = {"error": {"message": "Your request was rejected by the safety system.",
                      "type": "image_generation_user_error", "param": None, "code": "content_policy_violation"}}
    fake_openai.behave(fail_status=400, error_body=body)
    err = generate_error(gateway, 400)
    assert err.code == "content_policy_violation"
    assert "safety system" in err.message


def test_upstream_out_of_quota_is_not_retried_as_a_rate_limit(
        tmp_path: Path, fake_openai: FakeOpenAI, start_gateway: StartGateway) -> None:
    cfg = base_config(tmp_path, fake_openai.base_url)
    cfg["models"]["remote"]["routes"][0]["retry"] = {"attempts": 3, "backoff_s": 0}
    gw = start_gateway(cfg)
    fake_openai.behave(fail_status=429, fail_times=1)  # a passing rate limit: retried, then served
    sdk(gw).images.generate(model="remote", prompt="p", size="256x256")
    assert len(fake_openai.requests) == 2
    fake_openai.requests.clear()
    body = {"error": {"message": "You exceeded your current quota, please check your plan and billing details.",
                      "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}}
    fake_openai.behave(fail_status=429, error_body=body)
    err = generate_error(gw, 502)
    assert err.code == "upstream_quota_exceeded" and "exceeded your current quota" in err.message
    assert len(fake_openai.requests) == 1  # out of credit: waiting does not help, so no retry


def test_an_answer_over_max_answer_mb_is_refused_unread(
        tmp_path: Path, fake_openai: FakeOpenAI, start_gateway: StartGateway) -> None:
    fake_openai.noise = True  # photo-like PNGs: 1024x1024 is ~4 MB of base64, 256x256 ~0.26 MB
    cfg = base_config(tmp_path, fake_openai.base_url)
    cfg["providers"]["up"]["max_answer_mb"] = 1
    gw = start_gateway(cfg)
    err = generate_error(gw, 502, size="1024x1024")
    assert err.code == "upstream_bad_response" and "larger than 1 MB" in err.message
    assert sdk(gw).images.generate(model="remote", prompt="p", size="256x256").data[0].b64_json  # small ones pass


def test_upstream_rejecting_the_gateways_key_is_502_without_secrets(
        tmp_path: Path, fake_openai: FakeOpenAI, start_gateway: StartGateway) -> None:
    wrong_key = "sk-wrong-key-999"
    cfg = base_config(tmp_path, fake_openai.base_url)
    cfg["providers"]["up"]["api_key"] = wrong_key
    gw = start_gateway(cfg)
    err = generate_error(gw, 502)
    assert err.code == "upstream_auth_failed"
    assert wrong_key not in err.response.text
    assert fake_openai.requests == []  # the fake records only authorized requests


def test_upstream_500_is_502(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    fake_openai.behave(fail_status=500)
    err = generate_error(gateway, 502)
    assert isinstance(err, openai.InternalServerError)
    assert err.code == "upstream_error"


def test_upstream_429_is_429_with_retry_after(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    fake_openai.behave(fail_status=429, retry_after="7")
    err = generate_error(gateway, 429)
    assert isinstance(err, openai.RateLimitError)
    assert err.response.headers["retry-after"] == "7"


def test_slow_upstream_beyond_the_deadline_is_504(tmp_path: Path, fake_openai: FakeOpenAI,
                                                  start_gateway: StartGateway) -> None:
    cfg = base_config(tmp_path, fake_openai.base_url)
    cfg["server"]["request_timeout_s"] = 1
    gw = start_gateway(cfg)
    fake_openai.behave(delay_s=3)
    err = generate_error(gw, 504)
    assert err.code == "deadline_exceeded"
    fake_openai.behave()
    assert sdk(gw).images.generate(model="remote", prompt="p", size="256x256").data[0].b64_json


# -- routing: fallback, no fallback, disabled providers -------------------------------------------

def two_route_config(tmp_path: Path, first_url: str, second_url: str) -> dict[str, Any]:
    cfg = base_config(tmp_path, second_url)
    cfg["providers"]["first"] = {"type": "openai", "base_url": first_url, "api_key": UPSTREAM_KEY}
    cfg["models"]["remote"]["routes"] = [{"provider": "first", "model": "first-model"},
                                         {"provider": "up", "model": "upstream-model-x"}]
    return cfg


def test_connect_error_falls_back_to_the_next_route(tmp_path: Path, fake_openai: FakeOpenAI,
                                                    start_gateway: StartGateway) -> None:
    gw = start_gateway(two_route_config(tmp_path, f"http://127.0.0.1:{free_port()}/v1", fake_openai.base_url))
    resp = sdk(gw).images.with_raw_response.generate(model="remote", prompt="p", size="256x256")
    assert resp.status_code == 200
    assert resp.headers["x-imagegate-provider"] == "up"
    assert decode(resp.parse().data[0].b64_json).size == (256, 256)
    assert fake_openai.last.json is not None and fake_openai.last.json["model"] == "upstream-model-x"


MODERATED = {"error": {"message": "rejected by the safety system", "type": "image_generation_user_error",
                       "param": None, "code": "content_policy_violation"}}


@pytest.mark.parametrize(("status", "error_body", "falls_back"), [
    (400, None, False),
    (400, MODERATED, False),
    (500, None, True),
    (429, None, True),
    (401, None, True),
])
def test_fallback_only_when_another_route_may_succeed(
        tmp_path: Path, fake_openai: FakeOpenAI, second_fake: FakeOpenAI, start_gateway: StartGateway,
        status: int, error_body: dict[str, Any] | None, falls_back: bool) -> None:
    gw = start_gateway(two_route_config(tmp_path, fake_openai.base_url, second_fake.base_url))
    fake_openai.behave(fail_status=status, error_body=error_body)
    if status == 401:
        fake_openai.api_key = "sk-some-other-key"
    if falls_back:
        resp = sdk(gw).images.with_raw_response.generate(model="remote", prompt="p", size="256x256")
        assert resp.headers["x-imagegate-provider"] == "up"
        assert len(second_fake.requests) == 1
    else:
        generate_error(gw, 400)
        assert len(fake_openai.requests) == 1 and second_fake.requests == []


def test_provider_with_unset_secret_is_disabled_and_its_model_is_503(
        tmp_path: Path, fake_openai: FakeOpenAI, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("IMAGEGATE_TEST_UNSET_KEY", raising=False)
    cfg = base_config(tmp_path, fake_openai.base_url)
    cfg["providers"]["locked"] = {"type": "openai", "base_url": fake_openai.base_url,
                                  "api_key": "${IMAGEGATE_TEST_UNSET_KEY}"}
    cfg["models"]["locked-model"] = {"routes": [{"provider": "locked", "model": "upstream-model-x"}]}
    with caplog.at_level(logging.WARNING, logger="imagegate"):
        gw = start_gateway(cfg)
    assert any("'locked' disabled" in r.getMessage() and "IMAGEGATE_TEST_UNSET_KEY not set" in r.getMessage()
               for r in caplog.records)
    ready = gw.http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["disabled_providers"] == {"locked": "IMAGEGATE_TEST_UNSET_KEY not set"}
    err = generate_error(gw, 503, model="locked-model")
    assert err.code == "no_healthy_route"
    assert int(err.response.headers["retry-after"]) > 0
    assert fake_openai.requests == []
    card = gw.http.get("/v1/models/locked-model").json()
    assert card["routes"] == [{"provider": "locked", "enabled": False}]
    assert sdk(gw).images.generate(model="remote", prompt="p", size="256x256").data  # other routes still serve


def test_gateway_keeps_answering_after_every_kind_of_failure(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    for mode in ("garbage", "foreign_url", "not_image", "empty"):
        fake_openai.behave(mode=mode)
        generate_error(gateway, 502)
    fake_openai.behave()
    resp = httpx.post(f"{gateway.url}/v1/images/generations", json={"model": "remote", "prompt": "p",
                                                                     "size": "256x256"}, timeout=30)
    assert resp.status_code == 200 and decode(resp.json()["data"][0]["b64_json"]).size == (256, 256)
