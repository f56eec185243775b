"""Helpers of the bad-input tests: bad images, request builders and error assertions."""

from __future__ import annotations

import io
import json
import random
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types import ImagesResponse
from PIL import Image

from tests.conftest import UPSTREAM_KEY, Gateway, png_bytes
from tests.conftest import b64 as b64  # for the test modules that import it from here
from tests.fakes.openai_upstream import FakeOpenAI

GENERATIONS, EDITS = "/v1/images/generations", "/v1/images/edits"
LIMIT = 8 * 1024 * 1024  # max_body_mb: 8 in the test config
DROP = object()  # a field value meaning "leave this field out of the body"


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
