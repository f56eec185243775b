"""The `bfl` adapter through a live gateway: what it sends to the FLUX API, how it polls, how it fails.

The official `openai` SDK talks to one gateway (module-scoped) whose models route to FakeBFL, a real
HTTP server on 127.0.0.1 that validates bodies per model family as BFL does and records everything.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from PIL import Image

from imagegate.providers.bfl import BFLProvider
from tests.conftest import (
    NO_BREAKER,
    PIL_FORMAT,
    Gateway,
    b64,
    base_config,
    checked_error,
    decode,
    expect_error,
    leave_once,
    png_bytes,
    sdk,
    serve_gateway,
)
from tests.fakes.bfl_upstream import FakeBFL

BFL_KEY = "bfl_test-upstream-secret-456"
WRONG_KEY = "bfl_wrong-key-789"
HIDDEN = (BFL_KEY, WRONG_KEY, "Traceback")  # what no error the gateway answers may show
LOOSE = {"min_side": 16, "max_side": 4096, "multiple_of": 8, "max_n": 4}  # the adapter's rules are what refuse


def gateway_config(tmp: Path, fake_url: str) -> dict[str, Any]:
    cfg = base_config(tmp)
    fast = {"type": "bfl", "base_url": fake_url, "api_key": BFL_KEY, "poll_interval_s": 0.01,
            "poll_max_interval_s": 0.05, "timeout_s": 10, "max_poll_errors": 2, **NO_BREAKER}
    cfg["providers"].update({"bfl": fast, "bfl-hang": {**fast, "timeout_s": 1},
                             "bfl-local": {**fast, "polling_hosts": ["localhost"], "download_hosts": ["localhost"]},
                             "bfl-badkey": {**fast, "api_key": WRONG_KEY}})

    def model(upstream: str, provider: str = "bfl", route: dict[str, Any] | None = None, **more: Any) -> dict[str, Any]:
        return {"limits": LOOSE, "routes": [{"provider": provider, "model": upstream, **(route or {})}], **more}

    cfg["models"].update({
        "flux2": model("flux-2-pro"), "klein": model("flux-2-klein-4b"),
        "flex": model("flux-2-flex", defaults={"steps": 30, "guidance_scale": 20.0}),
        "flux11": model("flux-pro-1.1", defaults={"steps": 30, "guidance_scale": 3.5}),
        "dev": model("flux-dev", defaults={"steps": 28, "guidance_scale": 3.0}),
        "tuned": model("flux-pro-1.1", route={"safety_tolerance": 6, "prompt_upsampling": True}),
        "tuned2": model("flux-2-pro", route={"safety_tolerance": 6}),
        "ultra": model("flux-pro-1.1-ultra", route={"raw": True}),
        "kontext": model("flux-kontext-pro"), "fill-alias": model("flux-fill"), "mystery": model("flux-9-turbo"),
        "fill": model("flux-pro-1.0-fill", defaults={"steps": 40, "guidance_scale": 60.0}),
        "open": model("flux-2-pro", allow_extra_fields=True),
        "local": model("flux-2-pro", "bfl-local"), "hang": model("flux-2-pro", "bfl-hang"),
        "badkey": model("flux-2-pro", "bfl-badkey"),
    })
    return cfg


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeBFL]:
    with FakeBFL(BFL_KEY) as server:
        yield server


@pytest.fixture(autouse=True)
def fresh(fake: FakeBFL) -> None:
    fake.reset()


@pytest.fixture(scope="module")
def gw(fake: FakeBFL, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with serve_gateway(gateway_config(tmp_path_factory.mktemp("bfl"), fake.base_url)) as gateway:
        yield gateway


def generate_error(gw: Gateway, status: int, **kwargs: Any) -> openai.APIStatusError:
    call: dict[str, Any] = {"model": "flux2", "prompt": "a lighthouse", "size": "256x256", **kwargs}
    return expect_error(lambda: sdk(gw).images.generate(**call), status, *HIDDEN)


# -- submit bodies, field by field, per family ---------------------------------------------------

def test_flux2_generation_is_one_submit_polled_at_polling_url(gw: Gateway, fake: FakeBFL) -> None:
    resp = sdk(gw).images.with_raw_response.generate(model="flux2", prompt="a lighthouse at dusk", size="1024x768",
                                                     extra_body={"seed": 42})
    [sent] = fake.submits
    assert sent.path == "/v1/flux-2-pro"
    assert sent.json == {"prompt": "a lighthouse at dusk", "width": 1024, "height": 768, "seed": 42,
                         "output_format": "png", "safety_tolerance": 2}
    assert sent.headers["x-key"] == BFL_KEY
    assert sent.headers["content-type"] == "application/json"
    assert "test-key" not in str(sent.headers)  # the client's own key never travels upstream
    [task] = fake.tasks.values()
    assert [p.path for p in fake.polls] == [f"/v1/get_result?id={task.id}"] * 2  # one Pending, then Ready
    assert all(p.headers["x-key"] == BFL_KEY for p in fake.polls)
    [download] = fake.downloads  # fetched once, at once, and without the key
    assert "x-key" not in download.headers
    assert resp.headers["x-imagegate-provider"] == "bfl"
    parsed = resp.parse()
    assert [item.seed for item in parsed.data] == [42]  # type: ignore[attr-defined]
    assert (decode(parsed.data[0].b64_json).format, decode(parsed.data[0].b64_json).size) == ("PNG", (1024, 768))
    assert "/results/" not in resp.text  # BFL's expiring URL never reaches the client


@pytest.mark.parametrize(("model", "size", "fmt", "asked"), [
    ("flux2", "512x512", "jpeg", "jpeg"), ("flux2", "512x256", "webp", "png"), ("dev", "1024x768", "webp", "png"),
    ("ultra", "1344x768", "png", "png"), ("kontext", "768x1344", "jpeg", "jpeg"),
])
def test_images_are_real_and_of_the_asked_size_and_format(gw: Gateway, fake: FakeBFL, model: str, size: str,
                                                          fmt: str, asked: str) -> None:
    resp = sdk(gw).images.generate(model=model, prompt="p", size=size, output_format=fmt)  # type: ignore[arg-type]
    assert (fake.submits[0].json or {})["output_format"] == asked  # BFL has no webp: the gateway converts
    img = decode(resp.data[0].b64_json)
    assert (img.format, f"{img.size[0]}x{img.size[1]}") == (PIL_FORMAT[fmt], size)


def test_flex_sends_steps_and_guidance_within_its_ranges(gw: Gateway, fake: FakeBFL) -> None:
    sdk(gw).images.generate(model="flex", prompt="p", size="512x512", extra_body={"seed": 1})
    assert fake.submits[0].json == {"prompt": "p", "width": 512, "height": 512, "seed": 1, "output_format": "png",
                                    "safety_tolerance": 2, "steps": 30, "guidance": 10.0}  # 20 clamped to 10


def test_flux1_bodies_take_steps_only_on_dev_and_pro(gw: Gateway, fake: FakeBFL) -> None:
    sdk(gw).images.generate(model="dev", prompt="p", size="1024x768", extra_body={"seed": 7})
    sdk(gw).images.generate(model="flux11", prompt="p", size="1440x256", extra_body={"seed": 8})
    assert [s.path for s in fake.submits] == ["/v1/flux-dev", "/v1/flux-pro-1.1"]
    common = {"prompt": "p", "output_format": "png", "safety_tolerance": 2, "prompt_upsampling": False}
    assert fake.submits[0].json == {**common, "width": 1024, "height": 768, "seed": 7, "steps": 28, "guidance": 3.0}
    assert fake.submits[1].json == {**common, "width": 1440, "height": 256, "seed": 8}


def test_route_options_override_safety_and_upsampling(gw: Gateway, fake: FakeBFL) -> None:
    resp = sdk(gw).images.generate(model="tuned", prompt="a cat", size="512x512")
    sdk(gw).images.generate(model="tuned2", prompt="a cat", size="512x512")
    first, second = (s.json or {} for s in fake.submits)
    assert (first["safety_tolerance"], first["prompt_upsampling"]) == (6, True)
    assert second["safety_tolerance"] == 5 and "prompt_upsampling" not in second  # FLUX.2 tops out at 5
    assert resp.data[0].revised_prompt == "a cat, highly detailed, cinematic lighting"


def test_ultra_sends_a_reduced_aspect_ratio_and_the_gateway_fits_the_output(gw: Gateway, fake: FakeBFL) -> None:
    resp = sdk(gw).images.generate(model="ultra", prompt="p", size="1344x768", extra_body={"seed": 3})
    assert fake.submits[0].json == {"prompt": "p", "aspect_ratio": "7:4", "seed": 3, "output_format": "png",
                                    "safety_tolerance": 2, "prompt_upsampling": False, "raw": True}
    assert decode(resp.data[0].b64_json).size == (1344, 768)  # the fake made ~1 MP at 7:4


def test_kontext_edit_sends_input_image_and_aspect_ratio(gw: Gateway, fake: FakeBFL) -> None:
    src = png_bytes(512, 384, (200, 10, 10))
    resp = sdk(gw).images.edit(model="kontext", image=("src.png", src, "image/png"), prompt="make it blue",
                               extra_body={"seed": 11})
    assert fake.submits[0].path == "/v1/flux-kontext-pro"
    assert fake.submits[0].json == {"prompt": "make it blue", "input_image": b64(src), "aspect_ratio": "4:3",
                                    "seed": 11, "output_format": "png", "safety_tolerance": 2,
                                    "prompt_upsampling": False}
    assert decode(resp.data[0].b64_json).size == (512, 384)


def test_flux2_multi_reference_edit_numbers_the_input_images(gw: Gateway, fake: FakeBFL) -> None:
    srcs = [png_bytes(256, 256, (i * 40, 0, 0)) for i in range(3)]
    sdk(gw).images.edit(model="flux2", image=[(f"{i}.png", s, "image/png") for i, s in enumerate(srcs)],
                        prompt="merge", size="512x512")
    sent = fake.submits[0].json or {}
    assert {k: sent[k] for k in ("input_image", "input_image_2", "input_image_3")} == {
        "input_image": b64(srcs[0]), "input_image_2": b64(srcs[1]), "input_image_3": b64(srcs[2])}
    assert (sent["width"], sent["height"]) == (512, 512) and "input_image_4" not in sent


@pytest.mark.parametrize("model", ["fill", "fill-alias"])
def test_fill_gets_image_and_a_mask_white_exactly_where_the_client_mask_was_transparent(
        gw: Gateway, fake: FakeBFL, model: str) -> None:
    src = png_bytes(256, 256, (10, 120, 30))
    mask, buf = Image.new("RGBA", (256, 256), (0, 0, 0, 255)), io.BytesIO()
    mask.paste((0, 0, 0, 0), (32, 64, 160, 200))       # transparent: inpaint here
    mask.paste((0, 0, 0, 100), (200, 0, 256, 10))      # mostly transparent: inpaint too
    mask.paste((0, 0, 0, 200), (0, 240, 50, 256))      # mostly opaque: keep
    mask.save(buf, "PNG")
    resp = sdk(gw).images.edit(model=model, image=("src.png", src, "image/png"),
                               mask=("mask.png", buf.getvalue(), "image/png"), prompt="a pond", extra_body={"seed": 5})
    sent = fake.submits[0].json or {}
    assert sent["image"] == b64(src)
    expected = Image.new("L", (256, 256), 0)
    expected.paste(255, (32, 64, 160, 200))
    expected.paste(255, (200, 0, 256, 10))
    got = decode(sent["mask"])
    assert got.size == (256, 256) and got.convert("L").tobytes() == expected.tobytes()
    tuned = {"steps": 40, "guidance": 60.0} if model == "fill" else {}
    assert {k: v for k, v in sent.items() if k not in ("image", "mask")} == {
        "prompt": "a pond", "seed": 5, "output_format": "png", "safety_tolerance": 2, "prompt_upsampling": False,
        **tuned}
    assert decode(resp.data[0].b64_json).size == (256, 256)


# -- n > 1, seeds ------------------------------------------------------------------------------------

def test_n3_fans_out_three_tasks_with_consecutive_seeds(gw: Gateway, fake: FakeBFL) -> None:
    resp = sdk(gw).images.generate(model="flux2", prompt="p", size="256x256", n=3, extra_body={"seed": 1000})
    assert sorted((s.json or {})["seed"] for s in fake.submits) == [1000, 1001, 1002]
    assert [item.seed for item in resp.data] == [1000, 1001, 1002]  # type: ignore[attr-defined]
    assert [decode(item.b64_json).size for item in resp.data] == [(256, 256)] * 3
    assert len({p.path for p in fake.polls}) == 3 and len(fake.downloads) == 3


@pytest.mark.parametrize(("behaviour", "expected"), [({"seed_shift": 5}, [2005, 2006]),
                                                     ({"report_seed": False}, [2000, 2001])])
def test_the_seed_bfl_reports_wins_else_the_one_sent(gw: Gateway, fake: FakeBFL, behaviour: dict[str, Any],
                                                      expected: list[int]) -> None:
    fake.behave(**behaviour)
    resp = sdk(gw).images.generate(model="flux2", prompt="p", size="256x256", n=2, extra_body={"seed": 2000})
    assert [item.seed for item in resp.data] == expected  # type: ignore[attr-defined]


# -- polling and delivery hosts ----------------------------------------------------------------------

def test_polling_follows_the_returned_url_to_another_trusted_host(gw: Gateway, fake: FakeBFL) -> None:
    fake.behave(polling_host="localhost", sample_host="localhost", pending_polls=2)
    resp = sdk(gw).images.generate(model="local", prompt="p", size="256x256")
    assert decode(resp.data[0].b64_json).size == (256, 256)
    assert len(fake.polls) == 3
    assert all(p.headers["host"] == f"localhost:{fake.port}" and p.headers["x-key"] == BFL_KEY for p in fake.polls)
    assert [d.headers["host"] for d in fake.downloads] == [f"localhost:{fake.port}"]


@pytest.mark.parametrize(("behaviour", "log"), [({"polling_host": "localhost"}, "polls"),
                                                ({"sample_host": "localhost"}, "downloads")])
def test_urls_on_untrusted_hosts_are_502_and_never_fetched(gw: Gateway, fake: FakeBFL, behaviour: dict[str, Any],
                                                           log: str) -> None:
    fake.behave(**behaviour)  # provider `bfl` trusts 127.0.0.1 (its base_url) and the BFL domains, not localhost
    assert generate_error(gw, 502).code == "upstream_bad_response"
    assert len(fake.submits) == 1 and getattr(fake, log) == []  # so the key never went to a polling_url elsewhere


@pytest.mark.parametrize("behaviour", [{"sample_ttl_s": 0}, {"sample_max_downloads": 0}])
def test_expired_sample_is_a_clean_502(gw: Gateway, fake: FakeBFL, behaviour: dict[str, Any]) -> None:
    fake.behave(**behaviour)
    err = generate_error(gw, 502)
    assert err.code == "upstream_download_failed" and "403" in err.message
    assert "AuthenticationFailed" not in err.response.text


# -- misbehaviour ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("behaviour", "status", "code"), [
    ({"fail_status": 500}, 502, "upstream_error"),
    ({"fail_status": 429, "retry_after": "7", "error_body": {"detail": "Too many active tasks"}}, 429,
     "upstream_rate_limited"),
    ({"fail_status": 503}, 502, "upstream_error"),
    ({"fail_status": 402, "error_body": {"detail": "Insufficient credits"}}, 502, "upstream_quota_exceeded"),
    ({"fail_status": 403, "error_body": {"detail": "Forbidden"}}, 502, "upstream_auth_failed"),
    ({"submit": "garbage"}, 502, "upstream_bad_response"),
    ({"submit": "missing_fields"}, 502, "upstream_bad_response"),
    ({"outcome": "request_moderated"}, 400, "content_policy_violation"),
    ({"outcome": "content_moderated", "details": {"Moderation Reasons": ["NSFW"]}}, 400, "content_policy_violation"),
    ({"outcome": "content_moderated", "terminal_http": 503}, 400, "content_policy_violation"),
    ({"outcome": "error"}, 502, "upstream_task_failed"),
    ({"outcome": "error", "terminal_http": 503}, 502, "upstream_task_failed"),
    ({"outcome": "not_found"}, 502, "upstream_task_failed"),
    ({"outcome": "no_sample"}, 502, "upstream_bad_response"),
    ({"outcome": "garbage"}, 502, "upstream_bad_response"),
    ({"outcome": "no_status"}, 502, "upstream_bad_response"),
    ({"sample_not_image": True}, 502, "upstream_bad_image"),
    ({"poll_fail_status": 502}, 502, "upstream_error"),
    ({"poll_fail_status": 429}, 429, "upstream_rate_limited"),
])
def test_misbehaviour_is_the_exact_error(gw: Gateway, fake: FakeBFL, behaviour: dict[str, Any], status: int,
                                         code: str) -> None:
    fake.behave(**behaviour)
    err = generate_error(gw, status)
    assert err.code == code
    assert "/results/" not in err.response.text and "get_result" not in err.response.text
    if "retry_after" in behaviour:
        assert err.response.headers["retry-after"] == behaviour["retry_after"]


@pytest.mark.parametrize("behaviour", [
    {"terminal_http": 503}, {"pending_http": 202, "pending_polls": 3}, {"poll_fail_status": 502, "poll_fail_times": 2},
    {"pending_status": "Queued", "pending_polls": 2}, {"delay_s": 0.2},
])
def test_answers_bfl_gives_that_still_succeed(gw: Gateway, fake: FakeBFL, behaviour: dict[str, Any]) -> None:
    fake.behave(**behaviour)
    resp = sdk(gw).images.generate(model="flux2", prompt="p", size="256x256")
    assert decode(resp.data[0].b64_json).size == (256, 256)
    assert len(fake.submits) == 1  # tolerated poll failures never resubmit (the task is paid for)


def test_moderation_reasons_are_shown_cleaned(gw: Gateway, fake: FakeBFL) -> None:
    fake.behave(outcome="request_moderated",
                details={"Moderation Reasons": ["Derivative\n Works", f"key {BFL_KEY} flagged"]})
    err = generate_error(gw, 400)  # the helper checks the key is redacted
    assert err.code == "content_policy_violation"
    assert "Derivative Works" in err.message and "\n" not in err.message and fake.downloads == []


def test_wrong_key_is_502_auth_failed_without_the_key(gw: Gateway, fake: FakeBFL) -> None:
    assert generate_error(gw, 502, model="badkey").code == "upstream_auth_failed"
    assert fake.submits == []  # refused at the door with 401 {"detail": "Not authenticated"}


def test_422_from_bfl_is_400_upstream_rejected_with_param(gw: Gateway, fake: FakeBFL) -> None:
    fake.behave(fail_status=422, error_body={"detail": [
        {"loc": ["body", "width"], "msg": "Value error, width must be a multiple of 32", "type": "value_error"}]})
    err = generate_error(gw, 400)
    assert (err.code, err.param) == ("upstream_rejected", "size")
    assert "width: Value error, width must be a multiple of 32" in err.message


def test_a_field_bfl_refuses_for_real_comes_back_as_its_param(gw: Gateway, fake: FakeBFL) -> None:
    err = generate_error(gw, 400, model="open", extra_body={"interval": 2})  # flux-pro only, not FLUX.2
    assert (err.code, err.param) == ("upstream_rejected", "interval")
    assert "Extra inputs are not permitted" in err.message


def test_pass_through_fields_cannot_replace_what_the_gateway_set(gw: Gateway, fake: FakeBFL) -> None:
    """A model open to extra fields still sends the size it checked and bills, and the operator's
    moderation level, whatever the client puts in the body."""
    sdk(gw).images.generate(model="open", prompt="p", size="512x512",
                            extra_body={"width": 1440, "height": 1440, "safety_tolerance": 5, "seed": 3})
    sent = fake.submits[0].json
    assert (sent["width"], sent["height"], sent["safety_tolerance"]) == (512, 512, 2)


# -- deadline and cancellation -------------------------------------------------------------------------

def assert_polling_stops(fake: FakeBFL, within_s: float) -> int:
    """Polls stop: none for a quiet spell of many poll intervals (≤ 0.05 s), reached within `within_s`
    (a poll already on the wire when the work was cancelled may still land: that is not polling on)."""
    deadline = time.monotonic() + within_s
    while True:
        seen = len(fake.polls)
        time.sleep(0.5)
        if len(fake.polls) == seen:
            return seen
        assert time.monotonic() < deadline, f"still polling: {seen} -> {len(fake.polls)}"


def test_hung_task_is_504_quickly_and_polling_stops(gw: Gateway, fake: FakeBFL) -> None:
    fake.behave(outcome="never")
    started = time.monotonic()
    err = generate_error(gw, 504, model="hang")
    assert err.code == "upstream_timeout"
    assert time.monotonic() - started < 4
    assert assert_polling_stops(fake, within_s=3) > 3  # well before the 10 s a provider-wide timeout would take


def test_client_going_away_stops_polling(gw: Gateway, fake: FakeBFL) -> None:
    fake.behave(outcome="never")

    # The client leaves once the gateway has polled twice.
    leave_once(gw, {"model": "flux2", "prompt": "p", "size": "256x256"}, lambda: len(fake.polls) >= 2,
               "the gateway to poll")
    # The gateway sees the disconnect and cancels the work, well before flux2's 10 s timeout would.
    assert assert_polling_stops(fake, within_s=3) > 1


# -- what each family cannot do: 400 before any upstream call --------------------------------------------

@pytest.mark.parametrize(("model", "size"), [
    ("flux2", "1000x1000"), ("flux2", "48x48"), ("flux2", "2304x2048"),
    ("dev", "1008x1008"), ("dev", "1536x1536"), ("flux11", "224x224"),
    ("ultra", "2400x800"), ("kontext", "512x1536"), ("mystery", "1024x1024"),
    ("fill", "256x256"),  # Fill only inpaints
])
def test_sizes_or_models_the_family_cannot_take_are_400_without_a_call(gw: Gateway, fake: FakeBFL, model: str,
                                                                      size: str) -> None:
    assert generate_error(gw, 400, model=model, size=size).code == "unsupported_by_upstream"
    assert fake.submits == []


@pytest.mark.parametrize(("model", "images", "mask"), [
    ("flux11", 1, False), ("ultra", 1, False),                   # FLUX.1 and ultra cannot edit
    ("kontext", 1, True), ("flux2", 1, True),                    # masks only on Fill
    ("fill", 1, False), ("fill", 2, True),                       # Fill: one image and a mask
    ("klein", 5, False), ("kontext", 5, False), ("flux2", 9, False),  # reference image limits: 4, 4, 8
])
def test_edits_the_family_cannot_take_are_400_without_a_call(gw: Gateway, fake: FakeBFL, model: str, images: int,
                                                             mask: bool) -> None:
    files = [(f"{i}.png", png_bytes(256, 256), "image/png") for i in range(images)]
    kwargs: dict[str, Any] = {"mask": ("m.png", png_bytes(256, 256, (0, 0, 0, 0), "RGBA"), "image/png")} if mask else {}
    with pytest.raises(openai.APIStatusError) as info:
        sdk(gw).images.edit(model=model, image=files if images > 1 else files[0], prompt="x", **kwargs)
    assert checked_error(info.value, 400, *HIDDEN).code == "unsupported_by_upstream"
    assert fake.submits == []


def test_options_default_to_the_public_api() -> None:
    options = BFLProvider.Options.model_validate({"type": "bfl", "api_key": "k"})
    assert options.base_url == "https://api.bfl.ai"
    assert ".bfl.ai" in options.download_hosts and options.polling_hosts == [".bfl.ai", ".bfl.ml"]
    assert (options.poll_interval_s, options.poll_max_interval_s, options.safety_tolerance) == (0.5, 5.0, 2)
    assert options.prompt_upsampling is False
