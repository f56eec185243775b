"""Bad input gets a clear OpenAI-shaped 4xx naming the field, and nothing else happens.

"Nothing else" means: no upstream call (the `remote` model's fake upstream records every request),
no stored artifact, no stack trace and no upstream secret in the answer, and the gateway stays up.
Requests go through the official `openai` SDK where it can send them, raw httpx where it can't.

Bad requests change nothing, so one gateway and one fake upstream serve the whole module (starting
and stopping a server per test would dominate its run time); `fake_openai` is reset before each
test. A test that makes the upstream misbehave starts its own pair (`isolated`).
"""

from __future__ import annotations

import base64
import io
import json
import random
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from openai.types import ImagesResponse
from PIL import Image

from router.app import create_app
from router.config import load_text
from tests.conftest import UPSTREAM_KEY, Gateway, base_config, png_bytes
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.server import ServerThread

GENERATIONS, EDITS = "/v1/images/generations", "/v1/images/edits"
LIMIT = 8 * 1024 * 1024  # max_body_mb: 8 in the test config
DROP = object()  # a field value meaning "leave this field out of the body"


# -- fixtures (these `gateway` and `fake_openai` override conftest's for this module) ------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, FakeOpenAI]]:
    fake = FakeOpenAI(UPSTREAM_KEY).start()
    cfg = base_config(tmp_path_factory.mktemp("bad-input"), fake.base_url)
    app = create_app(load_text(yaml.safe_dump(cfg)))
    gw = Gateway(ServerThread(app).start(), app)
    yield gw, fake
    gw.close()
    fake.stop()


@pytest.fixture
def fake_openai(shared: tuple[Gateway, FakeOpenAI]) -> FakeOpenAI:
    fake = shared[1]
    fake.requests.clear()
    fake.behave()
    return fake


@pytest.fixture
def gateway(shared: tuple[Gateway, FakeOpenAI], fake_openai: FakeOpenAI) -> Gateway:
    return shared[0]


@pytest.fixture
def isolated(tmp_path: Path,
             start_gateway: Callable[[dict[str, Any]], Gateway]) -> Iterator[tuple[Gateway, FakeOpenAI]]:
    """A gateway and upstream of its own, for a test that changes how the upstream behaves."""
    fake = FakeOpenAI(UPSTREAM_KEY).start()
    yield start_gateway(base_config(tmp_path, fake.base_url)), fake
    fake.stop()


# -- images -------------------------------------------------------------------------------------


def noise(fmt: str, width: int = 64, height: int = 64) -> bytes:
    """Random pixels: the compressed data is big enough that cutting it lands inside the pixels."""
    img = Image.frombytes("RGB", (width, height), random.Random(7).randbytes(width * height * 3))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def bomb_png(width: int, height: int) -> bytes:
    """A 65-byte PNG whose header claims `width`×`height` 1-bit pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def gif_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "GIF")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


GOOD = png_bytes(64, 64)
NOT_IMAGES = [
    pytest.param(b"hello, this is plain text and not an image", id="text"),
    pytest.param(b"", id="empty"),
    pytest.param(half(noise("PNG")), id="truncated-png"),
    pytest.param(half(noise("JPEG")), id="truncated-jpeg"),
    pytest.param(gif_bytes(), id="gif"),
    pytest.param(bomb_png(20000, 20000), id="bomb-20000x20000"),
]


# -- assertions ---------------------------------------------------------------------------------


def check_error_text(text: str, status: int, param: str | None, code: str | None) -> dict[str, Any]:
    """The body is exactly `{"error": {message, type, param, code}}`; nothing internal leaks."""
    assert "Traceback" not in text and 'File "' not in text
    assert UPSTREAM_KEY not in text
    body = json.loads(text)
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"].strip()
    assert isinstance(error["type"], str) and error["type"]
    if status in (400, 404, 413, 415):
        assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def assert_error(resp: httpx.Response, status: int, param: str | None, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text[:500]
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.headers.get("x-request-id")
    return check_error_text(resp.text, status, param, code)


def assert_sdk_error(exc: openai.APIStatusError, status: int, param: str | None,
                     code: str | None = None) -> dict[str, Any]:
    """What the SDK makes of it: the right exception fields, from the same OpenAI-shaped body."""
    assert exc.status_code == status
    assert isinstance(exc.body, dict) and exc.body.get("message")
    assert exc.param == param
    if code is not None:
        assert exc.code == code
    return check_error_text(exc.response.text, status, param, code)


def assert_nothing_happened(gateway: Gateway, fake: FakeOpenAI) -> None:
    """No upstream call, no stored artifact (no test here asks for URLs), and the gateway is up."""
    assert fake.requests == [], "a bad request reached the upstream"
    assert not any(p.name.startswith("art_") for p in gateway.state.artifacts.dir.rglob("*"))
    assert gateway.http.get("/healthz").json() == {"status": "ok"}


def sdk_post(gateway: Gateway, path: str, body: dict[str, Any]) -> openai.APIStatusError:
    """POST a JSON body through the SDK (it can send any body this way) and return its error."""
    with pytest.raises(openai.APIStatusError) as info:
        gateway.client.post(path, body=body, cast_to=object)
    return info.value


def images_of(resp: ImagesResponse) -> list[dict[str, Any]]:
    """The answer's images as dicts, extension fields (`seed`) included; the SDK types `data` optional."""
    assert resp.data, "no images in the answer"
    assert all(item.b64_json for item in resp.data)
    return [item.model_dump() for item in resp.data]


def body_of(fields: dict[str, Any], **base: Any) -> dict[str, Any]:
    return {k: v for k, v in {**base, **fields}.items() if v is not DROP}


def multipart(files: list[tuple[str, tuple[str, bytes, str]]], data: dict[str, str]) -> tuple[bytes, str]:
    """A multipart body as httpx encodes it, and its content type (with the boundary)."""
    request = httpx.Request("POST", "http://x/", files=files, data=data)
    return request.read(), request.headers["content-type"]


def fields_only(fields: dict[str, str]) -> tuple[bytes, str]:
    """A multipart body with text fields and no file (httpx would send that form-encoded)."""
    boundary = "imagegate-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in fields.items()]
    return ("".join(parts) + f"--{boundary}--\r\n").encode(), f"multipart/form-data; boundary={boundary}"


def chunks(data: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    """A generator body: httpx sends it chunked, with no Content-Length."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


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
    pytest.param({"async": True}, "async", "unsupported_parameter", id="async-unsupported"),
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


# -- edits: fields and input images ------------------------------------------------------------


@pytest.mark.parametrize(("fields", "param"), [
    pytest.param({"foo": "1"}, "foo", id="unknown-field"),
    pytest.param({"n": "0"}, "n", id="n-0"),
    pytest.param({"strength": "1.5"}, "strength", id="strength-over-1"),
    pytest.param({"strength": "nan"}, "strength", id="strength-nan"),
    pytest.param({"size": "1000x1000"}, "size", id="size-not-multiple-of-16"),
    pytest.param({"prompt": "  "}, "prompt", id="prompt-spaces"),
    pytest.param({"input_fidelity": "max"}, "input_fidelity", id="input-fidelity"),
    pytest.param({"seed": "-1"}, "seed", id="seed-negative"),
])
def test_multipart_edit_field_is_400_naming_it(gateway: Gateway, fake_openai: FakeOpenAI,
                                              fields: dict[str, str], param: str) -> None:
    extra = {k: v for k, v in fields.items() if k != "prompt"}
    with pytest.raises(openai.BadRequestError) as info:
        gateway.client.images.edit(model="remote", prompt=fields.get("prompt", "make it blue"),
                                   image=("a.png", GOOD, "image/png"), extra_body=extra)
    assert_sdk_error(info.value, 400, param)
    assert_nothing_happened(gateway, fake_openai)


@pytest.mark.parametrize("image", NOT_IMAGES)
@pytest.mark.parametrize("slot", ["image", "mask"])
def test_multipart_non_image_is_400(gateway: Gateway, fake_openai: FakeOpenAI, image: bytes, slot: str) -> None:
    files: dict[str, Any] = {"image": ("a.png", GOOD, "image/png"), "mask": ("m.png", image, "image/png")}
    if slot == "image":
        files = {"image": ("a.png", image, "image/png")}
    with pytest.raises(openai.BadRequestError) as info:
        gateway.client.images.edit(model="remote", prompt="x", **files)
    assert_sdk_error(info.value, 400, slot, "invalid_image")
    assert_nothing_happened(gateway, fake_openai)


BAD_REFERENCES = [
    pytest.param("this is not base64!", "invalid_base64", id="invalid-base64"),
    pytest.param("iVBORw0KGgo", "invalid_base64", id="bad-padding"),
    pytest.param("data:image/png," + b64(GOOD), "invalid_base64", id="data-uri-not-base64"),
    pytest.param("data:image/png;base64,%%%%", "invalid_base64", id="data-uri-bad-payload"),
    pytest.param(b64(b"just some text, no image here"), "invalid_image", id="base64-text"),
    pytest.param(b64(half(noise("PNG"))), "invalid_image", id="truncated-png"),
    pytest.param(b64(half(noise("JPEG"))), "invalid_image", id="truncated-jpeg"),
    pytest.param(b64(bomb_png(20000, 20000)), "invalid_image", id="bomb"),
    pytest.param("", "invalid_value", id="empty-string"),
    pytest.param(123, "invalid_value", id="number"),
    pytest.param({"image_url": b64(GOOD), "file_id": "art_x"}, "invalid_value", id="both-url-and-file-id"),
    pytest.param({}, "invalid_value", id="empty-object"),
]


@pytest.mark.parametrize(("ref", "code"), BAD_REFERENCES)
@pytest.mark.parametrize(("slot", "param"), [("image", "image"), ("images", "images[0]"), ("mask", "mask")])
def test_json_edit_bad_image_reference_is_400(gateway: Gateway, fake_openai: FakeOpenAI, ref: Any, code: str,
                                             slot: str, param: str) -> None:
    body: dict[str, Any] = {"model": "remote", "prompt": "x", "image": b64(GOOD)}
    body[slot] = [ref] if slot == "images" else ref
    if slot == "images":
        del body["image"]
    assert_error(gateway.http.post(EDITS, json=body), 400, param, code)
    assert_nothing_happened(gateway, fake_openai)


def test_json_edit_unknown_artifact_is_404(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    body = {"model": "remote", "prompt": "x", "image": "art_" + "a" * 24}
    assert_error(gateway.http.post(EDITS, json=body), 404, "image", "artifact_not_found")
    assert_nothing_happened(gateway, fake_openai)


def _rgba(width: int, height: int) -> bytes:
    return png_bytes(width, height, (0, 0, 0, 0), mode="RGBA")


@pytest.mark.parametrize(("image", "mask", "param", "code"), [
    pytest.param(GOOD, _rgba(32, 32), "mask", "invalid_value", id="mask-other-size"),
    pytest.param(GOOD, _rgba(64, 32), "mask", "invalid_value", id="mask-other-height"),
    pytest.param(GOOD, png_bytes(64, 64), "mask", "invalid_value", id="mask-without-alpha"),
    pytest.param(GOOD, noise("JPEG"), "mask", "invalid_value", id="mask-jpeg"),
    pytest.param(None, _rgba(64, 64), "image", "missing_required_parameter", id="mask-without-image"),
])
@pytest.mark.parametrize("encoding", ["multipart", "json"])
def test_bad_mask_is_400(gateway: Gateway, fake_openai: FakeOpenAI, image: bytes | None, mask: bytes, param: str,
                         code: str, encoding: str) -> None:
    if encoding == "json":
        body = body_of({"image": b64(image) if image else DROP}, model="remote", prompt="x", mask=b64(mask))
        resp = gateway.http.post(EDITS, json=body)
    else:  # raw httpx: the SDK insists on an image
        files = [("image", ("a.png", image, "image/png"))] if image else []
        resp = gateway.http.post(EDITS, files=[*files, ("mask", ("m.png", mask, "image/png"))],
                                 data={"model": "remote", "prompt": "x"})
    error = assert_error(resp, 400, param, code)
    assert "mask" in error["message"] or "image" in error["message"]
    assert_nothing_happened(gateway, fake_openai)


@pytest.mark.parametrize("encoding", ["multipart", "json"])
def test_edit_without_image_is_400(gateway: Gateway, fake_openai: FakeOpenAI, encoding: str) -> None:
    fields = {"model": "remote", "prompt": "x"}
    if encoding == "json":
        resp = gateway.http.post(EDITS, json=fields)
    else:
        content, content_type = fields_only(fields)
        resp = gateway.http.post(EDITS, content=content, headers={"content-type": content_type})
    assert_error(resp, 400, "image", "missing_required_parameter")
    assert_nothing_happened(gateway, fake_openai)


@pytest.mark.parametrize(("width", "height"), [(20000, 20000), (8000, 8000), (1, 2**31 - 1), (65535, 65535)])
def test_decompression_bomb_is_400_and_gateway_stays_up(gateway: Gateway, fake_openai: FakeOpenAI,
                                                       width: int, height: int) -> None:
    bomb = bomb_png(width, height)
    assert len(bomb) < 100
    with pytest.raises(openai.BadRequestError) as info:
        gateway.client.images.edit(model="remote", prompt="x", image=("bomb.png", bomb, "image/png"))
    error = assert_sdk_error(info.value, 400, "image", "invalid_image")
    assert "pixel" in error["message"]  # says why, not "corrupt"
    upload = gateway.http.post("/v1/uploads", files={"file": ("bomb.png", bomb, "image/png")})
    assert_error(upload, 400, "file", "invalid_image")
    assert_nothing_happened(gateway, fake_openai)
    assert images_of(gateway.client.images.generate(model="demo", prompt="still here", size="64x64"))


@pytest.mark.parametrize("count", [17, 18, 25])
def test_more_than_16_images_is_400(gateway: Gateway, fake_openai: FakeOpenAI, count: int) -> None:
    images = [(f"{i}.png", GOOD, "image/png") for i in range(count)]
    with pytest.raises(openai.BadRequestError) as info:
        gateway.client.images.edit(model="remote", prompt="x", image=images)
    assert_sdk_error(info.value, 400, "image")
    assert "16" in info.value.message
    for key in ("image", "images"):
        resp = gateway.http.post(EDITS, json={"model": "remote", "prompt": "x", key: [b64(GOOD)] * count})
        assert "16" in assert_error(resp, 400, "image")["message"]
    assert_nothing_happened(gateway, fake_openai)


def test_16_images_are_accepted(gateway: Gateway) -> None:
    images = [(f"{i}.png", GOOD, "image/png") for i in range(16)]
    resp = gateway.client.images.edit(model="demo", prompt="x", image=images, size="64x64")
    assert len(images_of(resp)) == 1


@pytest.mark.parametrize(("files", "data", "param"), [
    pytest.param([("image", ("a.png", GOOD, "image/png")), ("photo", ("b.png", GOOD, "image/png"))],
                 {"prompt": "x"}, "photo", id="unknown-file-field"),
    pytest.param([("image", ("a.png", GOOD, "image/png"))], {"prompt": "x", "model": ["remote", "demo"]},
                 "model", id="field-twice"),
])
def test_multipart_shape_errors(gateway: Gateway, fake_openai: FakeOpenAI, files: list[Any],
                                data: dict[str, Any], param: str) -> None:
    resp = gateway.http.post(EDITS, files=files, data={"model": "remote", **data})
    assert_error(resp, 400, param)
    assert_nothing_happened(gateway, fake_openai)


def test_malformed_multipart_is_400(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    resp = gateway.http.post(EDITS, content=b"--xyz\r\nnot a part", headers={"content-type": "multipart/form-data"})
    assert_error(resp, 400, None, "invalid_multipart")
    assert_nothing_happened(gateway, fake_openai)


# -- routing, and what error bodies never contain ----------------------------------------------


@pytest.mark.parametrize(("method", "path", "status", "allow"), [
    ("GET", "/v1/nope", 404, None),
    ("POST", "/v1/images/variations", 404, None),
    ("GET", "/", 404, None),
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
