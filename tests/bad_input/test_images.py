"""Bad input images for edits and uploads: each a clear 400 (or 404) and nothing else happens."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.bad_input.support import (
    DROP,
    EDITS,
    GOOD,
    NOT_IMAGES,
    FakeOpenAI,
    Gateway,
    assert_error,
    assert_nothing_happened,
    assert_sdk_error,
    b64,
    body_of,
    bomb_png,
    fields_only,
    half,
    images_of,
    noise,
    png_bytes,
)

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
