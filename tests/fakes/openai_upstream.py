"""A fake OpenAI Images API: POST /v1/images/generations (JSON) and /v1/images/edits (multipart).

It answers like OpenAI (bearer auth, `{"error": {...}}` bodies, b64_json or an expiring URL) and
records every request so tests can assert what the gateway sent. `behave(...)` makes it misbehave.
"""

from __future__ import annotations

import asyncio
import base64
import io
import random
import secrets
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import orjson
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .server import FakeUpstream


@lru_cache(maxsize=32)
def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    """An incompressible PNG (random pixels): about 3 bytes a pixel, like a real photo-ish output."""
    rng = random.Random(seed)
    img = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


@lru_cache(maxsize=64)
def solid_image(width: int, height: int, seed: int, fmt: str = "png") -> bytes:
    color = ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256)
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt])
    return buf.getvalue()


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    json: dict[str, Any] | None = None
    form: dict[str, str] = field(default_factory=dict)
    files: list[tuple[str, str, bytes]] = field(default_factory=list)  # (field, filename, bytes)


class FakeOpenAI(FakeUpstream):
    def __init__(self, api_key: str = "sk-upstream-secret-123", *, noise: bool = False) -> None:
        self.api_key = api_key
        self.noise = noise  # random-pixel PNGs (big, realistic size) instead of solid colours
        self.requests: list[Recorded] = []
        self.mode = "b64"  # b64 | escaped | data_uri | url | foreign_url | garbage | not_image | empty | few
        self.fail_status: int | None = None
        self.fail_times = 0
        self.error_body: dict[str, Any] | None = None
        self.retry_after: str | None = None
        self.delay_s = 0.0
        self.files: dict[str, bytes] = {}
        self.record = True
        # A Set-Cookie on every answer, as OpenAI's edge sends Cloudflare's `__cf_bm`; None: none.
        self.cookie: str | None = None
        self._canned: dict[tuple[int, int], bytes] = {}
        self.app = Starlette(routes=[
            Route("/v1/images/generations", self._generations, methods=["POST"]),
            Route("/v1/images/edits", self._edits, methods=["POST"]),
            Route("/files/{name}", self._file, methods=["GET"]),
        ])

    # -- control -------------------------------------------------------------------------
    def behave(self, *, mode: str = "b64", fail_status: int | None = None, fail_times: int = 1_000_000,
               error_body: dict[str, Any] | None = None, retry_after: str | None = None,
               delay_s: float = 0.0) -> None:
        self.mode, self.fail_status, self.fail_times = mode, fail_status, fail_times
        self.error_body, self.retry_after, self.delay_s = error_body, retry_after, delay_s

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def last(self) -> Recorded:
        return self.requests[-1]

    # -- handlers ------------------------------------------------------------------------
    def _auth_error(self, request: Request) -> Response | None:
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return JSONResponse({"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                           "param": None, "code": "invalid_api_key"}}, status_code=401)
        return None

    async def _misbehave(self) -> Response | None:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail_status and self.fail_times > 0:
            self.fail_times -= 1
            body = self.error_body or {"error": {"message": f"fake failure {self.fail_status}",
                                                 "type": "server_error", "param": None, "code": None}}
            headers = {"retry-after": self.retry_after} if self.retry_after else {}
            return JSONResponse(body, status_code=self.fail_status, headers=headers)
        if self.mode == "garbage":
            return Response(b"<html>502 Bad Gateway</html>", media_type="text/html")
        return None

    def _image(self, width: int, height: int, seed: int, fmt: str) -> bytes:
        if self.noise:
            return noise_png(width, height)
        return solid_image(width, height, seed, fmt)

    def _answer(self, fields: dict[str, Any]) -> Response:
        width, height = (int(v) for v in str(fields.get("size", "1024x1024")).split("x"))
        n, seed = int(fields.get("n", 1)), int(fields.get("seed", 0))
        fmt = str(fields.get("output_format", "png"))
        data: list[dict[str, Any]] = []
        for i in range(n):
            image = self._image(width, height, seed + i, fmt)
            if self.mode in ("url", "foreign_url"):
                name = secrets.token_hex(8)
                self.files[name] = image
                host = self.url if self.mode == "url" else "http://evil.invalid"
                data.append({"url": f"{host}/files/{name}?se={int(time.time()) + 3600}"})
            elif self.mode == "data_uri":
                data.append({"b64_json": "data:image/png;base64," + base64.b64encode(image).decode()})
            elif self.mode == "not_image":
                data.append({"b64_json": base64.b64encode(b"definitely not an image").decode()})
            else:
                data.append({"b64_json": base64.b64encode(image).decode()})
        if self.mode == "empty":
            data = []
        elif self.mode == "few":  # one image fewer than asked, as some upstreams do
            data = data[:-1] or data
        body = {"created": int(time.time()), "data": data, "output_format": fmt, "size": f"{width}x{height}"}
        if self.mode == "escaped":  # as PHP's json_encode writes it: every "/" escaped, inside base64 too
            return Response(orjson.dumps(body).replace(b"/", b"\\/"), media_type="application/json")
        return Response(orjson.dumps(body), media_type="application/json")

    async def _generations(self, request: Request) -> Response:
        if (denied := self._auth_error(request)) is not None:
            return denied
        fields = orjson.loads(await request.body())
        if self.record:
            self.requests.append(Recorded("/v1/images/generations", dict(request.headers), json=fields))
        response = await self._misbehave() or self._answer(fields)
        if self.cookie is not None:
            response.headers.append("set-cookie", self.cookie)
        return response

    async def _edits(self, request: Request) -> Response:
        if (denied := self._auth_error(request)) is not None:
            return denied
        form = await request.form()
        rec = Recorded("/v1/images/edits", dict(request.headers))
        for key, value in form.multi_items():
            if isinstance(value, str):
                rec.form[key] = value
            else:
                rec.files.append((key, value.filename or "", await value.read()))
        if self.record:
            self.requests.append(rec)
        return await self._misbehave() or self._answer(rec.form)

    async def _file(self, request: Request) -> Response:
        data = self.files.get(request.path_params["name"])
        if data is None:
            return Response(b"expired", status_code=404)
        return Response(data, media_type="image/png")
