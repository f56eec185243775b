"""The `dashscope` adapter through a live gateway: what it sends DashScope, and how it survives misbehaviour.

The official `openai` SDK talks to one module-wide gateway whose models route to FakeDashScope (a real
HTTP server on 127.0.0.1 following DashScope's documented API, recording every request). The fake is
reset before each test.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from PIL import Image

from imagegate.providers.base import ImageRequest, InputImage
from imagegate.providers.dashscope import DashScopeOptions, DashScopeProvider
from tests.conftest import (
    NO_BREAKER,
    UPSTREAM_KEY,
    Gateway,
    b64,
    decode,
    expect_error,
    leave_once,
    png_bytes,
    sdk,
    serve_gateway,
)
from tests.fakes.dashscope_upstream import ASYNC_PATH, SYNC_PATH, FakeDashScope

WRONG_KEY = "sk-wrong-dashscope-999"
SQUARE = "1328x1328"
FIXED = ["1328x1328", "1664x928", "928x1664", "1472x1140", "1140x1472", "1472x1104", "1104x1472"]
FAST_POLLS = {"poll_interval_s": 0.01, "poll_max_interval_s": 0.03}


def config(fake: FakeDashScope, artifacts: str) -> dict[str, Any]:
    def provider(**options: Any) -> dict[str, Any]:
        return {"type": "dashscope", "base_url": fake.url, "api_key": UPSTREAM_KEY, **FAST_POLLS, **NO_BREAKER,
                **options}

    def model(*routes: dict[str, Any], multiple_of: int = 4, **fields: Any) -> dict[str, Any]:
        bounds = {"min_side": 256, "max_side": 2048, "multiple_of": multiple_of, "max_n": 4}
        return {"price_per_mp": 0.02, "default_size": SQUARE, "limits": bounds, "routes": list(routes), **fields}

    plus = {"provider": "ds", "model": "qwen-image-plus"}
    return {
        "server": {"max_body_mb": 8, "request_timeout_s": 20},
        "artifacts": {"dir": artifacts, "ttl_hours": 1},
        "providers": {
            "ds": provider(workspace="ws-1234"),
            # The documented form with /api/v1, and the task endpoint chosen provider-wide.
            "ds-async": provider(base_url=f"{fake.url}/api/v1", mode="async"),
            "ds-short": provider(mode="async", timeout_s=0.6),
            # Long enough for every submit of a fan-out to be answered (and its task known) before it ends.
            "ds-fanout": provider(mode="async", timeout_s=3),
            "ds-badkey": provider(api_key=WRONG_KEY),
        },
        "models": {
            "qwen": model(plus),
            "qwen-async": model({**plus, "mode": "async"}),  # a route overrides the provider's mode
            "qwen-async-provider": model({"provider": "ds-async", "model": "qwen-image"}),
            "qwen-extend": model({**plus, "prompt_extend": True, "watermark": True}),
            "qwen-extend-async": model({**plus, "mode": "async", "prompt_extend": True}),
            "qwen-extra": model(plus, allow_extra_fields=True),
            "qwen-fallback": model(plus, {"provider": "ds-async", "model": "qwen-image"}),
            "qwen2": model({"provider": "ds", "model": "qwen-image-2.0"}, multiple_of=16),
            "qwen-edit": model({"provider": "ds", "model": "qwen-image-edit-plus"}, multiple_of=16),
            "qwen-edit-async": model({"provider": "ds-async", "model": "qwen-image-edit-plus"}, multiple_of=16),
            "qwen-short": model({"provider": "ds-short", "model": "qwen-image-plus"}),
            "qwen-short-sync": model({"provider": "ds-short", "model": "qwen-image-plus", "mode": "sync"}),
            "qwen-fanout": model({"provider": "ds-fanout", "model": "qwen-image-plus"}),
            "qwen-badkey": model({"provider": "ds-badkey", "model": "qwen-image-plus"}),
            "qwen-badopt": model({**plus, "mode": "fast"}),
        },
        "default_model": "qwen",
    }


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, FakeDashScope]]:
    artifacts = str(tmp_path_factory.mktemp("dashscope") / "artifacts")
    with FakeDashScope(UPSTREAM_KEY) as fake, serve_gateway(config(fake, artifacts)) as gw:
        yield gw, fake


@pytest.fixture
def fake(shared: tuple[Gateway, FakeDashScope]) -> FakeDashScope:
    upstream = shared[1]
    upstream.requests.clear()
    upstream.cancels.clear()
    upstream.tasks.clear()
    upstream.behave()
    return upstream


@pytest.fixture
def gw(shared: tuple[Gateway, FakeDashScope], fake: FakeDashScope) -> Gateway:
    return shared[0]


def generate_error(gateway: Gateway, status: int, **kwargs: Any) -> openai.APIStatusError:
    call: dict[str, Any] = {"model": "qwen", "prompt": "a lighthouse", "size": SQUARE, **kwargs}
    return expect_error(lambda: sdk(gateway).images.generate(**call), status, UPSTREAM_KEY, WRONG_KEY)


# -- the request, field by field ----------------------------------------------------------------

def test_sync_generation_body_field_by_field(gw: Gateway, fake: FakeDashScope) -> None:
    resp = sdk(gw).images.with_raw_response.generate(
        model="qwen", prompt="a lighthouse at dusk", size="1664x928",  # type: ignore[arg-type]
        extra_body={"seed": 1234, "negative_prompt": "blurry, text", "steps": 20})
    [sent] = fake.submits()
    assert sent.path == SYNC_PATH
    assert sent.json == {
        "model": "qwen-image-plus",
        "input": {"messages": [{"role": "user", "content": [{"text": "a lighthouse at dusk"}]}]},
        "parameters": {"size": "1664*928", "n": 1, "seed": 1234, "prompt_extend": False, "watermark": False,
                       "negative_prompt": "blurry, text"},
    }
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert sent.headers["x-dashscope-workspace"] == "ws-1234"
    assert "x-dashscope-async" not in sent.headers
    assert "test-key" not in str(sent.headers)  # the client's own key never travels upstream
    assert resp.headers["x-imagegate-provider"] == "ds"
    item = resp.parse().data[0]
    assert item.seed == 1234  # type: ignore[attr-defined]
    assert item.revised_prompt is None  # prompt_extend off: nothing rewritten
    img = decode(item.b64_json)
    assert (img.format, img.size) == ("PNG", (1664, 928))


@pytest.mark.parametrize("model", ["qwen-async", "qwen-async-provider"])
def test_async_generation_submits_a_task_and_polls_it(gw: Gateway, fake: FakeDashScope, model: str) -> None:
    fake.behave(pending_polls=2, running_polls=2)
    resp = sdk(gw).images.generate(model=model, prompt="a red fox", size="928x1664",  # type: ignore[arg-type]
                                   output_format="webp", extra_body={"seed": 77, "negative_prompt": "fog"})
    [sent] = fake.submits()
    assert sent.path == ASYNC_PATH
    assert sent.headers["x-dashscope-async"] == "enable"
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert sent.json == {
        "model": "qwen-image-plus" if model == "qwen-async" else "qwen-image",
        "input": {"prompt": "a red fox", "negative_prompt": "fog"},
        "parameters": {"size": "928*1664", "n": 1, "seed": 77, "prompt_extend": False, "watermark": False},
    }
    [task] = fake.tasks.values()
    polls = [r.path for r in fake.requests if r.method == "GET"]
    assert polls == [f"/api/v1/tasks/{task.id}"] * 5  # 2 PENDING, 2 RUNNING, then SUCCEEDED
    assert task.status == "SUCCEEDED" and fake.cancels == []
    img = decode(resp.data[0].b64_json)
    assert (img.format, img.size, resp.data[0].seed) == ("WEBP", (928, 1664), 77)  # type: ignore[attr-defined]


def test_route_options_set_prompt_extend_and_watermark_and_revised_prompt_comes_back(
        gw: Gateway, fake: FakeDashScope) -> None:
    resp = sdk(gw).images.generate(model="qwen-extend", prompt="a cat", size=SQUARE)  # type: ignore[arg-type]
    params = fake.submits()[0].json["parameters"]
    assert (params["prompt_extend"], params["watermark"]) == (True, True)
    assert resp.data[0].revised_prompt == "a cat, rewritten in rich detail"
    fake.requests.clear()
    resp = sdk(gw).images.generate(model="qwen-extend-async", prompt="a dog", size=SQUARE)  # type: ignore[arg-type]
    assert fake.submits()[0].json["parameters"]["prompt_extend"] is True
    assert resp.data[0].revised_prompt == "a dog, rewritten in rich detail"


def test_extra_fields_the_model_allows_go_into_parameters(gw: Gateway, fake: FakeDashScope) -> None:
    sdk(gw).images.generate(model="qwen-extra", prompt="p", size=SQUARE,  # type: ignore[arg-type]
                            extra_body={"prompt_extend": True, "style": "vivid"})
    params = fake.submits()[0].json["parameters"]
    assert params["prompt_extend"] is True and "style" not in params  # OpenAI's style is not DashScope's


@pytest.mark.parametrize("model", ["qwen", "qwen-async"])
def test_n_fans_out_one_call_per_image_with_consecutive_seeds(gw: Gateway, fake: FakeDashScope, model: str) -> None:
    resp = sdk(gw).images.generate(model=model, prompt="p", size="1472x1104", n=3,  # type: ignore[arg-type]
                                   extra_body={"seed": 500})
    sent = [r.json["parameters"] for r in fake.submits()]
    assert sorted(p["seed"] for p in sent) == [500, 501, 502]
    assert all(p["n"] == 1 for p in sent)
    assert [item.seed for item in resp.data] == [500, 501, 502]  # type: ignore[attr-defined]
    assert [decode(item.b64_json).size for item in resp.data] == [(1472, 1104)] * 3


def test_seeds_are_sent_modulo_2_31_and_reported_as_sent(gw: Gateway, fake: FakeDashScope) -> None:
    resp = sdk(gw).images.generate(model="qwen", prompt="p", size=SQUARE, n=2,  # type: ignore[arg-type]
                                   extra_body={"seed": 2**32 - 1})
    assert sorted(r.json["parameters"]["seed"] for r in fake.submits()) == [0, 2**31 - 1]
    assert [item.seed for item in resp.data] == [2**31 - 1, 0]  # type: ignore[attr-defined]


def test_free_size_model_takes_any_size_in_its_pixel_range(gw: Gateway, fake: FakeDashScope) -> None:
    resp = sdk(gw).images.generate(model="qwen2", prompt="p", size="2048x1024")  # type: ignore[arg-type]
    assert fake.submits()[0].json["parameters"]["size"] == "2048*1024"
    assert decode(resp.data[0].b64_json).size == (2048, 1024)


# -- edits ------------------------------------------------------------------------------------------

def image_items(sent: Any) -> list[bytes]:
    content = sent.json["input"]["messages"][0]["content"]
    return [base64.b64decode(item["image"].split(",", 1)[1]) for item in content if "image" in item]


def test_edit_with_one_image_sends_it_as_a_data_url(gw: Gateway, fake: FakeDashScope) -> None:
    src = png_bytes(96, 96, (200, 10, 10))
    resp = sdk(gw).images.edit(model="qwen-edit", image=("src.png", src, "image/png"), prompt="make it blue",
                               size="768x512", extra_body={"seed": 9})  # type: ignore[arg-type]
    [sent] = fake.submits()
    content = sent.json["input"]["messages"][0]["content"]
    assert content == [{"image": "data:image/png;base64," + b64(src)},
                       {"text": "make it blue"}]
    assert sent.json["model"] == "qwen-image-edit-plus"
    assert sent.json["parameters"] == {"size": "768*512", "n": 1, "seed": 9, "prompt_extend": False,
                                       "watermark": False}
    img = decode(resp.data[0].b64_json)
    assert (img.format, img.size) == ("PNG", (768, 512))


def jpeg_bytes(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (4, 5, 6)).save(out, "JPEG")
    return out.getvalue()


def test_edit_with_two_images_goes_through_the_sync_endpoint_even_in_async_mode(
        gw: Gateway, fake: FakeDashScope) -> None:
    first, second = png_bytes(96, 96, (1, 2, 3)), jpeg_bytes(64, 80)
    resp = sdk(gw).images.edit(model="qwen-edit-async", prompt="merge them", size="768x768",
                               image=[("a.png", first, "image/png"), ("b.jpg", second, "image/jpeg")])
    [sent] = fake.submits()
    assert sent.path == SYNC_PATH  # the task endpoint is text-to-image only
    assert image_items(sent) == [first, second]  # in order, the exact bytes
    content = sent.json["input"]["messages"][0]["content"]
    assert content[1]["image"].startswith("data:image/jpeg;base64,")
    assert content[2] == {"text": "merge them"}
    assert decode(resp.data[0].b64_json).size == (768, 768)


# -- requests the upstream would refuse never reach it ----------------------------------------------

@pytest.mark.parametrize(("model", "size"), [("qwen", "1024x1024"), ("qwen", "1472x1108"), ("qwen2", "256x256"),
                                             ("qwen2", "256x1008")])
def test_unsupported_sizes_are_400_without_an_upstream_call(gw: Gateway, fake: FakeDashScope, model: str,
                                                            size: str) -> None:
    err = generate_error(gw, 400, model=model, size=size)
    assert err.code == "unsupported_by_upstream"
    assert fake.requests == []


@pytest.mark.parametrize("size", FIXED)
def test_every_fixed_size_is_accepted(gw: Gateway, fake: FakeDashScope, size: str) -> None:
    resp = sdk(gw).images.generate(model="qwen", prompt="p", size=size)  # type: ignore[arg-type]
    assert fake.submits()[0].json["parameters"]["size"] == size.replace("x", "*")
    assert decode(resp.data[0].b64_json).size == tuple(int(v) for v in size.split("x"))


@pytest.mark.parametrize(("model", "images", "mask", "size", "code"), [
    ("qwen-edit", 4, False, "512x512", "unsupported_by_upstream"),  # at most 3 input images
    ("qwen-edit", 1, True, "512x512", "unsupported_capability"),  # no inpaint: refused before routing
    ("qwen-edit", 1, False, "512x256", "unsupported_by_upstream"),  # edit sizes: 512..2048 a side
    ("qwen", 1, False, SQUARE, "unsupported_by_upstream"),  # qwen-image-plus only generates
    ("qwen-edit", 0, False, "512x512", "unsupported_by_upstream"),  # an edit model asked to generate
])
def test_what_dashscope_cannot_do_is_400_without_an_upstream_call(
        gw: Gateway, fake: FakeDashScope, model: str, images: int, mask: bool, size: str, code: str) -> None:
    if images == 0:
        err = generate_error(gw, 400, model=model, size=size)
    else:
        files = [(f"{i}.png", png_bytes(64, 64), "image/png") for i in range(images)]
        extra = {"mask": ("m.png", png_bytes(64, 64, (0, 0, 0, 0), mode="RGBA"), "image/png")} if mask else {}
        with pytest.raises(openai.BadRequestError) as info:
            sdk(gw).images.edit(model=model, image=files, prompt="x", size=size, **extra)  # type: ignore[arg-type]
        err = info.value
    assert err.code == code
    assert fake.requests == []


IMAGE = InputImage(png_bytes(8, 8), "png", 8, 8)
EDIT = {"operation": "edit", "images": [IMAGE], "width": 1024, "height": 1024}


@pytest.mark.parametrize(("model", "fields", "reason"), [
    ("qwen-image-max-2025-12-30", {}, None),
    ("qwen-image", {"width": 1024, "height": 1024}, "not one of"),
    ("qwen-image-2.0-pro", {"width": 2048, "height": 2048}, None),
    ("qwen-image-2.0", {"width": 4096, "height": 1025}, "pixels"),
    ("qwen-image-edit", EDIT, None),
    ("qwen-image-edit", {**EDIT, "mask": InputImage(png_bytes(8, 8), "png", 8, 8, has_alpha=True)}, "no mask"),
    ("qwen-image-edit", {**EDIT, "images": [IMAGE] * 4}, "at most 3"),
    ("qwen-image-edit", {**EDIT, "width": 2560}, "512 and 2048"),
    ("qwen-image-3.0", {"width": 640, "height": 640}, None),  # no known family: the upstream decides
])
def test_unsupported_reasons_per_model_family(model: str, fields: dict[str, Any], reason: str | None) -> None:
    provider = DashScopeProvider("ds", DashScopeOptions(type="dashscope", api_key="k"))
    base: dict[str, Any] = {"operation": "generate", "prompt": "p", "upstream_model": model, "width": 1328,
                            "height": 1328, "n": 1, "seed": 0}
    said = provider.unsupported(ImageRequest(**{**base, **fields}))
    assert said is None if reason is None else reason in (said or "")


def test_base_url_with_or_without_api_v1_and_aliyuncs_downloads() -> None:
    plain = DashScopeProvider("a", DashScopeOptions(type="dashscope"))
    full = DashScopeProvider("b", DashScopeOptions(type="dashscope", base_url="https://dashscope.aliyuncs.com/api/v1/"))
    assert plain.api == "https://dashscope-intl.aliyuncs.com/api/v1"
    assert full.api == "https://dashscope.aliyuncs.com/api/v1"
    assert plain.download_hosts() == ["dashscope-intl.aliyuncs.com", ".aliyuncs.com"]
    assert (plain.options.mode, plain.options.prompt_extend, plain.options.watermark) == ("sync", False, False)


# -- misbehaviour: the exact error, never a secret -----------------------------------------------------

ERROR_CASES = [
    ("ServiceUnavailable", 502, "upstream_error"),  # answered with HTTP 503
    ("InvalidParameter", 400, "upstream_rejected"),
    ("DataInspectionFailed", 400, "content_policy_violation"),
    ("Throttling", 429, "upstream_rate_limited"),
    ("Throttling.RateQuota", 429, "upstream_rate_limited"),
    ("Throttling.AllocationQuota", 502, "upstream_quota_exceeded"),
    ("Arrearage", 502, "upstream_quota_exceeded"),
    ("InternalError", 502, "upstream_error"),
]


@pytest.mark.parametrize("model", ["qwen", "qwen-async"])
@pytest.mark.parametrize(("error", "status", "code"), ERROR_CASES)
def test_error_codes_on_submit(gw: Gateway, fake: FakeDashScope, model: str, error: str, status: int,
                               code: str) -> None:
    fake.behave(error=error, retry_after="7", status=503 if error == "ServiceUnavailable" else None)
    err = generate_error(gw, status, model=model)
    assert err.code == code
    assert error in err.message  # DashScope's code stays visible to whoever reads the error
    if status == 429:
        assert err.response.headers["retry-after"] == "7"
    assert len(fake.submits()) == 1


@pytest.mark.parametrize(("error", "falls_back"), [
    ("Arrearage", True), ("Throttling.AllocationQuota", True), ("InternalError", True), ("Throttling", True),
    ("InvalidParameter", False), ("DataInspectionFailed", False),
])
def test_fallback_to_the_next_route_only_where_it_may_help(gw: Gateway, fake: FakeDashScope, error: str,
                                                           falls_back: bool) -> None:
    fake.behave(error=error, fail_times=1)  # the first route fails, a second call would succeed
    if falls_back:
        resp = sdk(gw).images.with_raw_response.generate(model="qwen-fallback", prompt="p", size=SQUARE)
        assert resp.headers["x-imagegate-provider"] == "ds-async"
        assert [r.path for r in fake.submits()] == [SYNC_PATH, ASYNC_PATH]
    else:
        generate_error(gw, 400, model="qwen-fallback")
        assert [r.path for r in fake.submits()] == [SYNC_PATH]


def test_wrong_key_is_502_auth_failed_without_the_key(gw: Gateway, fake: FakeDashScope) -> None:
    err = generate_error(gw, 502, model="qwen-badkey")
    assert err.code == "upstream_auth_failed"
    assert fake.requests == []  # the fake records authorized requests only


@pytest.mark.parametrize(("task", "task_code", "status", "code"), [
    ("failed", "InternalError", 502, "upstream_error"),
    ("failed", "DataInspectionFailed", 400, "content_policy_violation"),
    ("failed", "InvalidParameter", 400, "upstream_rejected"),
    ("failed", "Arrearage", 502, "upstream_quota_exceeded"),
    ("item_failed", "DataInspectionFailed", 400, "content_policy_violation"),
    ("unknown", "", 502, "upstream_error"),
])
def test_failed_tasks_map_their_output_code(gw: Gateway, fake: FakeDashScope, task: str, task_code: str,
                                            status: int, code: str) -> None:
    fake.behave(task=task, task_code=task_code)
    err = generate_error(gw, status, model="qwen-async")
    assert err.code == code
    assert fake.cancels == []  # a task that ended needs no cancel


@pytest.mark.parametrize("model", ["qwen", "qwen-async"])
@pytest.mark.parametrize(("mode", "code"), [
    ("garbage", "upstream_bad_response"), ("no_output", "upstream_bad_response"),
    ("no_choices", "upstream_bad_response"), ("not_url", "upstream_bad_response"),
    ("foreign_url", "upstream_bad_response"), ("expired_url", "upstream_download_failed"),
])
def test_bad_answers_are_502(gw: Gateway, fake: FakeDashScope, model: str, mode: str, code: str) -> None:
    fake.behave(mode=mode)
    err = generate_error(gw, 502, model=model)
    assert err.code == code
    assert "evil.invalid" not in err.response.text and "Signature" not in err.response.text


def test_transient_poll_failures_are_tolerated(gw: Gateway, fake: FakeDashScope) -> None:
    fake.behave(error="InternalError", fail_on="poll", fail_times=2)
    resp = sdk(gw).images.generate(model="qwen-async", prompt="p", size=SQUARE)  # type: ignore[arg-type]
    assert decode(resp.data[0].b64_json).size == (1328, 1328)
    fake.tasks.clear()
    fake.behave(error="InternalError", fail_on="poll")  # a third miss in a row: given up
    assert generate_error(gw, 502, model="qwen-async").code == "upstream_error"
    [task] = fake.tasks.values()
    assert fake.cancels == [task.id] and task.status == "CANCELED"  # abandoned while PENDING


def test_bad_route_option_is_502_misconfigured(gw: Gateway, fake: FakeDashScope) -> None:
    err = generate_error(gw, 502, model="qwen-badopt")
    assert err.code == "upstream_misconfigured" and "'mode'" in err.message
    assert fake.requests == []


# -- deadlines and cancellation ---------------------------------------------------------------------------

def test_slow_sync_answer_beyond_timeout_is_504(gw: Gateway, fake: FakeDashScope) -> None:
    fake.behave(delay_s=3)
    started = time.monotonic()
    assert generate_error(gw, 504, model="qwen-short-sync").code == "upstream_timeout"
    assert time.monotonic() - started < 2.5  # the 0.6 s timeout, not the upstream's 3 s


def test_pending_task_past_timeout_is_504_and_cancelled_upstream(gw: Gateway, fake: FakeDashScope) -> None:
    fake.behave(task="never")
    started = time.monotonic()
    assert generate_error(gw, 504, model="qwen-short").code == "upstream_timeout"
    assert time.monotonic() - started < 3
    [task] = fake.tasks.values()
    assert fake.cancels == [task.id] and task.status == "CANCELED"
    cancel = next(r for r in fake.requests if r.path.endswith("/cancel"))
    assert cancel.method == "POST" and cancel.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


def test_running_task_is_not_cancelled_on_timeout(gw: Gateway, fake: FakeDashScope) -> None:
    fake.behave(pending_polls=0, running_polls=1_000_000)  # RUNNING: DashScope could not cancel it anyway
    assert generate_error(gw, 504, model="qwen-short").code == "upstream_timeout"
    assert fake.cancels == []


def test_client_disconnect_cancels_the_pending_task(gw: Gateway, fake: FakeDashScope) -> None:
    fake.behave(task="never")

    # The client leaves once the gateway polls the task (so it knows the task id).
    leave_once(gw, {"model": "qwen-async", "prompt": "p", "size": SQUARE},
               lambda: any(r.method == "GET" and "/tasks/" in r.path for r in fake.requests),
               "the gateway to poll the task")
    deadline = time.monotonic() + 5
    while not fake.cancels and time.monotonic() < deadline:  # the gateway notices the disconnect, then cancels
        time.sleep(0.02)
    [task] = fake.tasks.values()
    assert fake.cancels == [task.id] and task.status == "CANCELED"


def test_timeout_cancels_every_pending_task_of_a_fan_out(gw: Gateway, fake: FakeDashScope) -> None:
    fake.behave(task="never")
    assert generate_error(gw, 504, model="qwen-fanout", n=3).code == "upstream_timeout"
    assert sorted(fake.cancels) == sorted(fake.tasks) and len(fake.tasks) == 3
