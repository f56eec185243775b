"""The `gemini` adapter through a live gateway: what it sends to generateContent, and how it survives misbehaviour.

The `openai` SDK talks to one module-wide gateway whose models route to FakeGemini (a real server that checks
bodies like Google's and records every request): `nano` (gemini-3-pro-image-preview, default options),
`nano-old` (gemini-2.5-flash-image: no imageSize, at most 2 inputs, negative prompt appended, IMAGE only, extra
fields allowed), `nano-badkey`, `nano-slow` (timeout_s 1), `nano-fallback` (then demo), `nano-missing`.
"""
from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from PIL import Image

from imagegate.providers.base import ImageRequest, InputImage
from imagegate.providers.gemini import GeminiOptions, GeminiProvider, image_config
from tests.conftest import NO_BREAKER, PIL_FORMAT, Gateway, b64, decode, expect_error, png_bytes, sdk, serve_gateway
from tests.fakes.gemini_upstream import FakeGemini

KEY = "AIzaSyFAKE-gemini-upstream-key-0123456789"
WRONG_KEY = "AIzaSyFAKE-not-a-key-the-fake-knows-999"
LIMITS = {"min_side": 256, "max_side": 4096, "multiple_of": 8, "max_n": 4}


def gateway_config(tmp_path: Path, url: str) -> dict[str, Any]:
    gem = {"type": "gemini", "base_url": url, "api_key": KEY, **NO_BREAKER}
    providers = {
        "demo": {"type": "demo"},
        "gem": gem,
        "gem-old": {**gem, "send_image_size": False, "max_input_images": 2, "append_negative_prompt": True,
                    "response_modalities": ["IMAGE"],
                    "safety_settings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_ONLY_HIGH"}]},
        "gem-badkey": {**gem, "api_key": WRONG_KEY},
        "gem-slow": {**gem, "timeout_s": 1},
    }

    def model(*routes: tuple[str, str], **extra: Any) -> dict[str, Any]:
        return {"limits": LIMITS, "routes": [{"provider": p, "model": m} for p, m in routes], **extra}

    pro = ("gem", "gemini-3-pro-image-preview")
    models = {
        "nano": model(pro),
        "nano-old": model(("gem-old", "gemini-2.5-flash-image"), allow_extra_fields=True),
        "nano-badkey": model(("gem-badkey", "gemini-3-pro-image-preview")),
        "nano-slow": model(("gem-slow", "gemini-3-pro-image-preview")),
        "nano-fallback": model(pro, ("demo", "demo")),
        "nano-missing": model(("gem", "gemini-9-imaginary")),
    }
    return {"server": {"max_body_mb": 16, "request_timeout_s": 20},
            "artifacts": {"dir": str(tmp_path / "artifacts"), "ttl_hours": 1},
            "providers": providers, "models": models, "default_model": "nano",
            "auto": {"policy": "priority", "candidates": ["nano"]}}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeGemini]:
    with FakeGemini(KEY) as server:
        yield server


@pytest.fixture(scope="module")
def gw(fake: FakeGemini, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with serve_gateway(gateway_config(tmp_path_factory.mktemp("gemini"), fake.url)) as gateway:
        yield gateway


@pytest.fixture(autouse=True)
def clean_fake(fake: FakeGemini) -> None:
    fake.reset()


def error(gw: Gateway, status: int, model: str = "nano", **kwargs: Any) -> openai.APIStatusError:
    """Generate, expect an OpenAI-shaped error with `status` that shows no upstream key."""
    call: dict[str, Any] = {"model": model, "prompt": "a lighthouse", "size": "1024x1024", **kwargs}
    return expect_error(lambda: sdk(gw).images.generate(**call), status, KEY, WRONG_KEY)


def color_at_centre(b64: str) -> tuple[int, ...]:
    img = decode(b64).convert("RGB")
    return img.getpixel((img.width // 2, img.height // 2))  # type: ignore[return-value]


# -- the request, field by field ------------------------------------------------------------------

def test_generation_is_translated_field_by_field(gw: Gateway, fake: FakeGemini) -> None:
    resp = sdk(gw).images.with_raw_response.generate(
        model="nano", prompt="a lighthouse at dusk", size="1536x1024",
        extra_body={"seed": 1234, "negative_prompt": "blurry", "steps": 30, "guidance_scale": 4.0})
    assert len(fake.calls) == 1
    sent = fake.last
    assert sent.model == "gemini-3-pro-image-preview"
    # Negative prompt, steps and guidance have no Gemini field: not sent (nano's provider does not append).
    assert sent.body == {
        "contents": [{"role": "user", "parts": [{"text": "a lighthouse at dusk"}]}],
        "generationConfig": {"responseModalities": ["TEXT", "IMAGE"], "imageConfig": {"aspectRatio": "3:2"},
                             "seed": 1234},
    }
    assert sent.headers["x-goog-api-key"] == KEY
    assert sent.headers["content-type"] == "application/json"
    assert "authorization" not in sent.headers  # the client's own key never travels upstream
    assert sent.query == ""  # the key is never in the URL
    assert sent.answered == (1248, 832)
    assert resp.headers["x-imagegate-provider"] == "gem"
    item = resp.parse().data[0]
    assert item.seed == 1234  # type: ignore[attr-defined]
    img = decode(item.b64_json)
    assert (img.format, img.size) == ("PNG", (1536, 1024))  # fitted by the gateway


@pytest.mark.parametrize(("size", "fmt", "expected", "answered"), [
    ("1024x1024", "png", {"aspectRatio": "1:1"}, (1024, 1024)),
    ("1344x768", "jpeg", {"aspectRatio": "16:9"}, (1344, 768)),
    ("768x1344", "webp", {"aspectRatio": "9:16"}, (768, 1344)),
    ("1024x1536", "png", {"aspectRatio": "2:3"}, (832, 1248)),
    ("1280x1024", "jpeg", {"aspectRatio": "4:3"}, (1184, 864)),         # 5:4 is not offered: nearest is 4:3
    ("2560x1024", "webp", {"aspectRatio": "21:9", "imageSize": "2K"}, (3072, 1344)),
    ("2048x2048", "png", {"aspectRatio": "1:1", "imageSize": "2K"}, (2048, 2048)),
])
def test_size_becomes_aspect_ratio_and_tier_and_the_client_gets_the_asked_size(
        gw: Gateway, fake: FakeGemini, size: str, fmt: str, expected: dict[str, str],
        answered: tuple[int, int]) -> None:
    resp = sdk(gw).images.generate(model="nano", prompt="p", size=size, output_format=fmt)  # type: ignore[arg-type]
    assert fake.last.config["imageConfig"] == expected
    assert fake.last.answered == answered
    img = decode(resp.data[0].b64_json)
    width, height = (int(v) for v in size.split("x"))
    assert (img.format, img.size) == (PIL_FORMAT[fmt], (width, height))


@pytest.mark.parametrize(("width", "height", "expected"), [
    (1024, 1024, {"aspectRatio": "1:1"}),
    (1536, 1024, {"aspectRatio": "3:2"}),                      # 1248x832 scaled 1.23x: within 1.25x
    (1536, 1536, {"aspectRatio": "1:1", "imageSize": "2K"}),   # 1024 would need 1.5x
    (1600, 1600, {"aspectRatio": "1:1", "imageSize": "2K"}),
    (4096, 4096, {"aspectRatio": "1:1", "imageSize": "4K"}),
    (3840, 2160, {"aspectRatio": "16:9", "imageSize": "4K"}),  # 2K (2688x1536) would need 1.43x
    (8192, 8192, {"aspectRatio": "1:1", "imageSize": "4K"}),   # nothing larger
    (512, 4096, {"aspectRatio": "9:16", "imageSize": "4K"}),   # cropped to 1:8, the height decides
    (2560, 1024, {"aspectRatio": "21:9", "imageSize": "2K"}),
    (256, 256, {"aspectRatio": "1:1"}),
])
def test_image_config_mapping(width: int, height: int, expected: dict[str, str]) -> None:
    assert image_config(width, height) == expected


def test_image_config_honours_configured_ratios_and_no_image_size() -> None:
    assert image_config(1280, 1024, ratios=["1:1", "4:3", "5:4"]) == {"aspectRatio": "5:4"}
    assert image_config(2048, 2048, send_image_size=False) == {"aspectRatio": "1:1"}


def test_old_model_options_no_image_size_negative_prompt_appended_extra_fields(
        gw: Gateway, fake: FakeGemini) -> None:
    resp = sdk(gw).images.generate(model="nano-old", prompt="a red fox", size="2048x2048",
                                   extra_body={"seed": 7, "negative_prompt": "text, watermark",
                                               "temperature": 0.4})
    sent = fake.last
    assert sent.model == "gemini-2.5-flash-image"
    assert sent.body == {
        "contents": [{"role": "user", "parts": [{"text": "a red fox\n\nAvoid: text, watermark"}]}],
        "generationConfig": {"temperature": 0.4, "responseModalities": ["IMAGE"],
                             "imageConfig": {"aspectRatio": "1:1"}, "seed": 7},
        "safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_ONLY_HIGH"}],
    }
    assert sent.answered == (1024, 1024)  # the model answers 1K; the gateway scales it
    assert decode(resp.data[0].b64_json).size == (2048, 2048)


# -- n and seeds ----------------------------------------------------------------------------------

def test_n_fans_out_one_call_per_image_with_consecutive_seeds(gw: Gateway, fake: FakeGemini) -> None:
    resp = sdk(gw).images.generate(model="nano", prompt="p", size="1024x1024", n=3, extra_body={"seed": 500})
    assert sorted(call.config["seed"] for call in fake.calls) == [500, 501, 502]
    assert all(call.parts == [{"text": "p"}] for call in fake.calls)
    assert [item.seed for item in resp.data] == [500, 501, 502]  # type: ignore[attr-defined]
    # The fake paints each image from its seed: the images are the three different answers, in order.
    colors = [color_at_centre(item.b64_json) for item in resp.data]  # type: ignore[arg-type]
    assert colors == [((s * 37) % 256, (s * 91) % 256, (s * 53) % 256) for s in (500, 501, 502)]


def test_seed_is_sent_as_int32_and_the_value_sent_is_reported(gw: Gateway, fake: FakeGemini) -> None:
    resp = sdk(gw).images.generate(model="nano", prompt="p", size="1024x1024", n=2,
                                   extra_body={"seed": 2**32 - 1})
    # seed_for(0) = 2**32-1 -> 2**31-1; seed_for(1) wraps to 0.
    assert sorted(call.config["seed"] for call in fake.calls) == [0, 2**31 - 1]
    assert [item.seed for item in resp.data] == [2**31 - 1, 0]  # type: ignore[attr-defined]


def test_one_failing_call_of_a_fan_out_fails_the_request(gw: Gateway, fake: FakeGemini) -> None:
    # Both calls are held until both have reached the fake (a barrier, not a guessed delay): only then
    # does the first one fail, and cancel its sibling.
    fake.behave(fail_status=500, fail_times=1, together=2)
    err = error(gw, 502, n=2)
    assert err.code == "upstream_error"
    assert len(fake.calls) == 2


# -- edits and references ------------------------------------------------------------------------

def test_edit_sends_the_image_inline_and_gets_an_image_made_from_it(gw: Gateway, fake: FakeGemini) -> None:
    src = png_bytes(512, 512, (200, 10, 10))
    resp = sdk(gw).images.edit(model="nano", image=("src.png", src, "image/png"), prompt="make it cyan",
                               extra_body={"seed": 3, "strength": 0.3})
    sent = fake.last
    inline = {"inlineData": {"mimeType": "image/png", "data": b64(src)}}
    assert sent.body == {
        "contents": [{"role": "user", "parts": [{"text": "make it cyan"}, inline]}],
        "generationConfig": {"responseModalities": ["TEXT", "IMAGE"], "imageConfig": {"aspectRatio": "1:1"},
                             "seed": 3},
    }
    assert sent.answered == (1024, 1024)
    img = decode(resp.data[0].b64_json)
    assert img.size == (512, 512)  # the edit keeps the input's size
    assert color_at_centre(resp.data[0].b64_json) == (55, 245, 245)  # the fake inverted the input


def test_multi_reference_edit_carries_every_image_with_its_type_and_exact_bytes(
        gw: Gateway, fake: FakeGemini) -> None:
    first = png_bytes(768, 512, (1, 2, 3))
    buf = io.BytesIO()
    Image.new("RGB", (300, 300), (90, 90, 200)).save(buf, "JPEG")
    second = buf.getvalue()
    resp = sdk(gw).images.edit(model="nano", image=[("a.png", first, "image/png"), ("b.jpg", second, "image/jpeg")],
                               prompt="put the blue square into the scene", size="1536x1024")
    sent = fake.last
    assert sent.parts[0] == {"text": "put the blue square into the scene"}
    assert sent.images == [("image/png", first), ("image/jpeg", second)]
    assert sent.config["imageConfig"] == {"aspectRatio": "3:2"}
    assert decode(resp.data[0].b64_json).size == (1536, 1024)
    assert color_at_centre(resp.data[0].b64_json) == (254, 253, 252)  # made from the first image


def test_more_input_images_than_the_provider_takes_is_400_without_a_call(gw: Gateway, fake: FakeGemini) -> None:
    images = [(f"{i}.png", png_bytes(256, 256, (i, i, i)), "image/png") for i in range(3)]
    with pytest.raises(openai.BadRequestError) as info:
        sdk(gw).images.edit(model="nano-old", image=images, prompt="merge")
    assert info.value.code == "unsupported_by_upstream"
    assert "at most 2 input images" in info.value.message
    assert fake.calls == []


def test_a_mask_is_400_without_a_call(gw: Gateway, fake: FakeGemini) -> None:
    mask = png_bytes(256, 256, (0, 0, 0, 0), mode="RGBA")
    with pytest.raises(openai.BadRequestError) as info:
        sdk(gw).images.edit(model="nano", image=("a.png", png_bytes(256, 256), "image/png"),
                            mask=("m.png", mask, "image/png"), prompt="fill")
    assert info.value.code == "unsupported_capability"
    assert fake.calls == []


def test_unsupported_names_masks_and_too_many_images() -> None:
    provider = GeminiProvider("g", GeminiOptions(type="gemini", api_key="k", max_input_images=1))
    image = InputImage(png_bytes(64, 64), "png", 64, 64)
    request = ImageRequest(operation="edit", prompt="p", upstream_model="m", width=64, height=64, n=1, seed=1,
                           images=[image])
    assert provider.unsupported(request) is None
    request.mask = image
    assert provider.unsupported(request) == "Gemini edits by instruction and takes no mask"
    request.mask, request.images = None, [image, image]
    assert provider.unsupported(request) == "at most 1 input images (got 2)"


# -- answers the adapter must read ---------------------------------------------------------------

def test_snake_case_inline_data_is_read(gw: Gateway, fake: FakeGemini) -> None:
    fake.behave(mode="snake_case")
    resp = sdk(gw).images.generate(model="nano", prompt="p", size="1024x1024", extra_body={"seed": 11})
    assert color_at_centre(resp.data[0].b64_json) == ((11 * 37) % 256, (11 * 91) % 256, (11 * 53) % 256)


@pytest.mark.parametrize("mode", ["thought", "with_audio"])
def test_draft_images_and_other_media_are_skipped_for_the_image(gw: Gateway, fake: FakeGemini, mode: str) -> None:
    fake.behave(mode=mode)
    resp = sdk(gw).images.generate(model="nano", prompt="p", size="1024x1024", extra_body={"seed": 12})
    assert color_at_centre(resp.data[0].b64_json) == ((12 * 37) % 256, (12 * 91) % 256, (12 * 53) % 256)


# -- misbehaviour: the exact status and code, never the key --------------------------------------

@pytest.mark.parametrize(("behaviour", "status", "code"), [
    ({"mode": "blocked"}, 400, "content_policy_violation"),
    ({"mode": "blocked", "block_reason": "PROHIBITED_CONTENT"}, 400, "content_policy_violation"),
    ({"mode": "refused"}, 400, "content_policy_violation"),                       # IMAGE_SAFETY
    ({"mode": "refused", "finish_reason": "IMAGE_PROHIBITED_CONTENT"}, 400, "content_policy_violation"),
    ({"mode": "refused", "finish_reason": "SAFETY"}, 400, "content_policy_violation"),
    ({"mode": "refused", "finish_reason": "IMAGE_RECITATION"}, 400, "content_policy_violation"),
    ({"mode": "refused", "finish_reason": "IMAGE_OTHER"}, 502, "upstream_no_image"),
    ({"mode": "refused", "finish_reason": "NO_IMAGE"}, 502, "upstream_no_image"),
    ({"mode": "text_only"}, 502, "upstream_no_image"),                           # STOP with words only
    ({"mode": "text_only", "finish_reason": "NO_IMAGE"}, 502, "upstream_no_image"),
    ({"mode": "no_candidates"}, 502, "upstream_no_image"),
    ({"mode": "garbage"}, 502, "upstream_bad_response"),
    ({"mode": "bad_base64"}, 502, "upstream_bad_response"),
    ({"mode": "not_image"}, 502, "upstream_bad_image"),
    ({"fail_status": 400}, 400, "upstream_rejected"),
    ({"fail_status": 403}, 502, "upstream_auth_failed"),
    ({"fail_status": 500}, 502, "upstream_error"),
    ({"fail_status": 503}, 502, "upstream_error"),
])
def test_misbehaviour_is_the_exact_error(gw: Gateway, fake: FakeGemini, behaviour: dict[str, Any], status: int,
                                         code: str) -> None:
    fake.behave(**behaviour)
    err = error(gw, status)
    assert err.code == code
    assert len(fake.calls) == 1


def test_moderation_message_names_the_reason(gw: Gateway, fake: FakeGemini) -> None:
    fake.behave(mode="refused")
    assert "IMAGE_SAFETY" in error(gw, 400).message
    fake.behave(mode="text_only")
    assert "I can't draw that" in error(gw, 502).message  # what the model said instead of drawing


def test_upstream_400_keeps_its_message(gw: Gateway, fake: FakeGemini) -> None:
    fake.behave(fail_status=400)
    assert "Request contains an invalid argument." in error(gw, 400).message


def test_wrong_key_answered_as_http_400_is_auth_failed(gw: Gateway, fake: FakeGemini) -> None:
    err = error(gw, 502, model="nano-badkey")
    assert err.code == "upstream_auth_failed"
    assert "API key not valid" in err.message
    assert fake.calls == []  # the fake records only requests that pass auth


def test_key_echoed_in_an_upstream_message_is_redacted(gw: Gateway, fake: FakeGemini) -> None:
    body = {"error": {"code": 403, "message": f"Permission denied: Consumer 'api_key:{KEY}' has been suspended.",
                      "status": "PERMISSION_DENIED"}}
    fake.behave(fail_status=403, error_body=body)
    err = error(gw, 502)  # the helper asserts the key is absent
    assert "api_key:***" in err.message


def test_location_not_supported_is_502_not_the_clients_fault(gw: Gateway, fake: FakeGemini) -> None:
    body = {"error": {"code": 400, "message": "User location is not supported for the API use.",
                      "status": "FAILED_PRECONDITION"}}
    fake.behave(fail_status=400, error_body=body)
    assert error(gw, 502).code == "upstream_error"


def test_unknown_model_is_502_not_found(gw: Gateway, fake: FakeGemini) -> None:
    assert error(gw, 502, model="nano-missing").code == "upstream_not_found"


@pytest.mark.parametrize(("behaviour", "retry_after"), [
    ({"retry_after": "7"}, "7"),
    ({"retry_delay": "12s"}, "12"),              # google.rpc.RetryInfo when there is no header
    ({"retry_after": "3", "retry_delay": "40s"}, "3"),
])
def test_rate_limit_is_429_with_retry_after(gw: Gateway, fake: FakeGemini, behaviour: dict[str, str],
                                            retry_after: str) -> None:
    fake.behave(fail_status=429, **behaviour)  # type: ignore[arg-type]
    err = error(gw, 429)
    assert err.code == "upstream_rate_limited"
    assert err.response.headers["retry-after"] == retry_after


def test_a_spent_daily_quota_is_out_of_quota_not_a_rate_limit(gw: Gateway, fake: FakeGemini) -> None:
    """Google's 429 RESOURCE_EXHAUSTED for a per-day quota: no retry helps today, so it falls back."""
    body = {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED",
                      "message": "You exceeded your current quota, please check your plan and billing details.",
                      "details": [{"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [
                          {"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                           "quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]},
                          {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "20s"}]}}
    fake.behave(fail_status=429, error_body=body)
    err = error(gw, 502)
    assert err.code == "upstream_quota_exceeded" and "exceeded your current quota" in err.message


def test_slow_upstream_is_504(gw: Gateway, fake: FakeGemini) -> None:
    fake.behave(delay_s=1.5)
    assert error(gw, 504, model="nano-slow").code == "upstream_timeout"


# -- routing --------------------------------------------------------------------------------------

def test_no_image_falls_back_to_the_next_route(gw: Gateway, fake: FakeGemini) -> None:
    fake.behave(mode="text_only")
    resp = sdk(gw).images.with_raw_response.generate(model="nano-fallback", prompt="p", size="1024x1024")
    assert resp.headers["x-imagegate-provider"] == "demo"
    assert decode(resp.parse().data[0].b64_json).size == (1024, 1024)
    assert len(fake.calls) == 1


def test_moderation_does_not_fall_back(gw: Gateway, fake: FakeGemini) -> None:
    fake.behave(mode="blocked")
    assert error(gw, 400, model="nano-fallback").code == "content_policy_violation"
    assert len(fake.calls) == 1
