"""Bad input gets a clear OpenAI-shaped 4xx naming the field, and nothing else happens.

"Nothing else" means: no upstream call (the `remote` model's fake upstream records every request),
no stored artifact, no stack trace and no upstream secret in the answer, and the gateway stays up.
Requests go through the official `openai` SDK where it can send them, raw httpx where it can't.
This module: bodies and content types, request fields, routing; input images are in
test_images.py.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.bad_input.support import (
    DROP,
    EDITS,
    GENERATIONS,
    GOOD,
    LIMIT,
    UPSTREAM_KEY,
    FakeOpenAI,
    Gateway,
    assert_error,
    assert_nothing_happened,
    assert_sdk_error,
    body_of,
    chunks,
    images_of,
    json,
    multipart,
    sdk_post,
)

# -- transport: JSON, content type, body size ---------------------------------------------------


@pytest.mark.parametrize("path", [GENERATIONS, EDITS])
@pytest.mark.parametrize("content", [
    pytest.param(b'{"model": "remote", "prompt": "x",', id="cut-off"),
    pytest.param(b"", id="empty"),
    pytest.param(b"model=remote&prompt=x", id="form-encoded"),
    pytest.param(b'{"model": "remote", "prompt": "x"} trailing', id="trailing-garbage"),
    pytest.param(b'{"model": "remote", "prompt": "x", "guidance_scale": NaN}', id="nan-literal"),
    pytest.param(b"\xff\xfe{\x00}\x00", id="not-utf8"),
    pytest.param(b"[]", id="array"),
    pytest.param(b'[{"model": "remote", "prompt": "x"}]', id="array-of-object"),
    pytest.param(b'"a red fox"', id="string"),
    pytest.param(b"42", id="number"),
    pytest.param(b"null", id="null"),
])
def test_bad_json_is_400_invalid_json(gateway: Gateway, fake_openai: FakeOpenAI, path: str, content: bytes) -> None:
    resp = gateway.http.post(path, content=content, headers={"content-type": "application/json"})
    assert_error(resp, 400, None, "invalid_json")
    assert_nothing_happened(gateway, fake_openai)


@pytest.mark.parametrize(("path", "content_type"), [
    (GENERATIONS, "text/plain"),
    (GENERATIONS, "multipart/form-data; boundary=xyz"),
    (GENERATIONS, "application/x-www-form-urlencoded"),
    (GENERATIONS, None),
    (EDITS, "text/plain"),
    (EDITS, "application/x-www-form-urlencoded"),
    (EDITS, "image/png"),
    (EDITS, None),
])
def test_wrong_content_type_is_415(gateway: Gateway, fake_openai: FakeOpenAI, path: str,
                                   content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    resp = gateway.http.post(path, content=b'{"model": "remote", "prompt": "x"}', headers=headers)
    assert_error(resp, 415, None, "unsupported_media_type")
    assert_nothing_happened(gateway, fake_openai)


def _oversized(kind: str) -> tuple[bytes, str]:
    padding = "a" * (LIMIT + 1024 * 1024)
    if kind == "json":
        return json.dumps({"model": "remote", "prompt": padding}).encode(), "application/json"
    return multipart([("image", ("big.png", padding.encode(), "image/png"))], {"model": "remote", "prompt": "x"})


@pytest.mark.parametrize(("path", "kind"), [(GENERATIONS, "json"), (EDITS, "json"), (EDITS, "multipart")])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_max_body_mb_is_413(gateway: Gateway, fake_openai: FakeOpenAI, path: str, kind: str,
                                      chunked: bool) -> None:
    data, content_type = _oversized(kind)
    resp = gateway.http.post(path, content=chunks(data) if chunked else data,
                             headers={"content-type": content_type})
    # The two ways the limit is enforced: the declared length, or counting a chunked body.
    assert ("content-length" in resp.request.headers) is not chunked
    assert_error(resp, 413, None, "request_too_large")
    assert_nothing_happened(gateway, fake_openai)


def test_body_under_the_limit_is_read_and_validated(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    data = json.dumps({"model": "remote", "prompt": "a" * (LIMIT - 1024 * 1024)}).encode()
    resp = gateway.http.post(GENERATIONS, content=chunks(data), headers={"content-type": "application/json"})
    assert_error(resp, 400, "prompt")  # over 32000 characters, but not over the byte limit
    assert_nothing_happened(gateway, fake_openai)


# -- request fields -----------------------------------------------------------------------------

FIELD_ERRORS = [
    pytest.param({"foo": 1}, "foo", "unknown_parameter", id="unknown-field"),
    pytest.param({"n": 0}, "n", None, id="n-0"),
    pytest.param({"n": 5}, "n", None, id="n-over-max_n"),
    pytest.param({"n": "many"}, "n", None, id="n-not-int"),
    pytest.param({"size": "1000x1000"}, "size", None, id="size-not-multiple-of-16"),
    pytest.param({"size": "abc"}, "size", None, id="size-abc"),
    pytest.param({"size": "1024"}, "size", None, id="size-one-side"),
    pytest.param({"size": "32x32"}, "size", None, id="size-under-min"),
    pytest.param({"size": "4096x4096"}, "size", None, id="size-over-max"),
    pytest.param({"size": "512x0"}, "size", None, id="size-zero-side"),
    pytest.param({"aspect_ratio": "wide"}, "aspect_ratio", None, id="aspect-garbage"),
    pytest.param({"aspect_ratio": "0:1"}, "aspect_ratio", None, id="aspect-zero"),
    pytest.param({"aspect_ratio": "20:1"}, "aspect_ratio", None, id="aspect-extreme"),
    pytest.param({"size": "512x512", "aspect_ratio": "16:9"}, "aspect_ratio", None, id="size-and-aspect"),
    pytest.param({"prompt": DROP}, "prompt", "missing_required_parameter", id="prompt-missing"),
    pytest.param({"prompt": None}, "prompt", "missing_required_parameter", id="prompt-null"),
    pytest.param({"prompt": "   \n\t "}, "prompt", None, id="prompt-spaces"),
    pytest.param({"prompt": "a" * 32_001}, "prompt", None, id="prompt-over-32000"),
    pytest.param({"prompt": 42}, "prompt", None, id="prompt-not-string"),
    pytest.param({"negative_prompt": "a" * 32_001}, "negative_prompt", None, id="negative-prompt-too-long"),
    pytest.param({"seed": -1}, "seed", None, id="seed-negative"),
    pytest.param({"seed": 2**32}, "seed", None, id="seed-2**32"),
    pytest.param({"seed": 10**30}, "seed", None, id="seed-huge"),
    pytest.param({"seed": 1.5}, "seed", None, id="seed-fraction"),
    pytest.param({"output_format": "jpeg", "output_compression": 101}, "output_compression", None,
                 id="compression-over-100"),
    pytest.param({"output_format": "webp", "output_compression": -1}, "output_compression", None,
                 id="compression-negative"),
    pytest.param({"output_compression": 50}, "output_compression", None, id="compression-with-default-png"),
    pytest.param({"output_format": "png", "output_compression": 0}, "output_compression", None,
                 id="compression-with-png"),
    pytest.param({"background": "transparent", "output_format": "jpeg"}, "background", None,
                 id="transparent-jpeg"),
    pytest.param({"background": "glass"}, "background", None, id="background-unknown"),
    pytest.param({"output_format": "gif"}, "output_format", None, id="output-format-gif"),
    pytest.param({"quality": "ultra"}, "quality", None, id="quality-ultra"),
    pytest.param({"response_format": "xml"}, "response_format", None, id="response-format-xml"),
    pytest.param({"guidance_scale": 1000}, "guidance_scale", None, id="guidance-over-100"),
    pytest.param({"steps": "many"}, "steps", None, id="steps-not-int"),
    pytest.param({"partial_images": 9}, "partial_images", None, id="partial-images-over-3"),
    pytest.param({"model": 7}, "model", None, id="model-not-string"),
    pytest.param({"async": True, "stream": True}, "async", "invalid_value", id="async-and-stream"),
]


@pytest.mark.parametrize("model", ["demo", "remote"])
@pytest.mark.parametrize(("fields", "param", "code"), FIELD_ERRORS)
def test_generation_field_is_400_naming_it(gateway: Gateway, fake_openai: FakeOpenAI, model: str,
                                          fields: dict[str, Any], param: str, code: str | None) -> None:
    body = body_of(fields, model=model, prompt="a red fox")
    assert_sdk_error(sdk_post(gateway, "/images/generations", body), 400, param, code)
    assert_nothing_happened(gateway, fake_openai)


@pytest.mark.parametrize(("fields", "param"), [
    pytest.param({"n": 0}, "n", id="n-0"),
    pytest.param({"size": "1000x1000"}, "size", id="size-not-multiple-of-16"),
    pytest.param({"quality": "ultra"}, "quality", id="quality-ultra"),
    pytest.param({"response_format": "xml"}, "response_format", id="response-format-xml"),
    pytest.param({"background": "transparent", "output_format": "jpeg"}, "background", id="transparent-jpeg"),
])
def test_typed_sdk_call_gets_bad_request_error(gateway: Gateway, fake_openai: FakeOpenAI,
                                               fields: dict[str, Any], param: str) -> None:
    """The SDK's own `images.generate` (no low-level post) raises BadRequestError with the param."""
    with pytest.raises(openai.BadRequestError) as info:
        gateway.client.images.generate(model="remote", prompt="a red fox", **fields)
    assert_sdk_error(info.value, 400, param)
    assert_nothing_happened(gateway, fake_openai)


@pytest.mark.parametrize("size", ["128x128", "2048x2048", "256x1600"])
def test_size_limits_are_per_model(gateway: Gateway, fake_openai: FakeOpenAI, size: str) -> None:
    """Legal on `demo` (64…2048), not on `remote` (256…1536)."""
    assert images_of(gateway.client.images.generate(model="demo", prompt="x", size=size))  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError) as info:
        gateway.client.images.generate(model="remote", prompt="x", size=size)  # type: ignore[arg-type]
    assert_sdk_error(info.value, 400, "size")
    assert "256" in info.value.message and "1536" in info.value.message
    assert fake_openai.requests == []


def test_limits_themselves_are_accepted(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    resp = gateway.client.images.generate(model="remote", prompt="a" * 32_000, size="256x256", n=4,
                                          extra_body={"seed": 2**32 - 1})
    assert [d["seed"] for d in images_of(resp)] == [2**32 - 1, 0, 1, 2]  # image i uses seed+i, mod 2**32
    assert fake_openai.last.json is not None and fake_openai.last.json["seed"] == 2**32 - 1


@pytest.mark.parametrize("path", [GENERATIONS, EDITS])
def test_unknown_model_is_404_model_not_found(gateway: Gateway, fake_openai: FakeOpenAI, path: str) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        if path == GENERATIONS:
            gateway.client.images.generate(model="no-such-model", prompt="x")
        else:
            gateway.client.images.edit(model="no-such-model", prompt="x", image=("a.png", GOOD, "image/png"))
    error = assert_sdk_error(info.value, 404, "model", "model_not_found")
    assert "no-such-model" in error["message"]
    with pytest.raises(openai.NotFoundError) as card:
        gateway.client.models.retrieve("no-such-model")
    assert_sdk_error(card.value, 404, "model", "model_not_found")
    assert_nothing_happened(gateway, fake_openai)


@pytest.mark.parametrize(("steps", "sent"), [(500, 60), (61, 60), (60, 60), (1, 1), (0, 1), (-7, 1)])
def test_steps_are_clamped_not_refused(gateway: Gateway, fake_openai: FakeOpenAI, steps: int, sent: int) -> None:
    resp = gateway.client.images.generate(model="remote", prompt="x", size="256x256", extra_body={"steps": steps})
    assert images_of(resp)
    assert [r.json["steps"] for r in fake_openai.requests if r.json is not None] == [sent]
    demo = gateway.client.images.generate(model="demo", prompt="x", size="64x64", extra_body={"steps": steps})
    assert images_of(demo)


# -- routing, and what error bodies never contain ----------------------------------------------


@pytest.mark.parametrize(("method", "path", "status", "allow"), [
    ("GET", "/v1/nope", 404, None),
    ("POST", "/v1/images/variations", 404, None),
    ("GET", "/nope", 404, None),  # (`/` redirects to the web page: tests/test_ui_headers.py)
    ("GET", GENERATIONS, 405, "POST"),
    ("PUT", EDITS, 405, "POST"),
    ("DELETE", "/v1/models", 405, "GET"),
])
def test_unknown_path_and_wrong_method(gateway: Gateway, fake_openai: FakeOpenAI, method: str, path: str,
                                       status: int, allow: str | None) -> None:
    resp = gateway.http.request(method, path, json={"model": "remote", "prompt": "x"})
    assert_error(resp, status, None, "not_found" if status == 404 else "method_not_allowed")
    if allow is not None:  # HTTP requires a 405 to list the allowed methods
        assert allow in resp.headers["allow"].split(", ") and method not in resp.headers["allow"]
    assert_nothing_happened(gateway, fake_openai)


@pytest.mark.parametrize(("upstream", "status", "code"), [
    (400, 400, "upstream_rejected"),  # the request's fault: passed on, with the key blanked out
    (401, 502, "upstream_auth_failed"),  # the gateway's own credentials: not the client's fault
    (403, 502, "upstream_auth_failed"),
])
def test_upstream_error_never_echoes_the_upstream_key(isolated: tuple[Gateway, FakeOpenAI], upstream: int,
                                                      status: int, code: str) -> None:
    gateway, fake_openai = isolated
    fake_openai.behave(fail_status=upstream, error_body={"error": {
        "message": f"Incorrect API key provided: {UPSTREAM_KEY}. Bearer {UPSTREAM_KEY}",
        "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}})
    with pytest.raises(openai.APIStatusError) as info:
        gateway.client.images.generate(model="remote", prompt="x", size="256x256")
    assert_sdk_error(info.value, status, None, code)  # checks the key is nowhere in the body
    assert len(fake_openai.requests) == 1  # one route, and a 4xx is not retried
