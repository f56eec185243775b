"""Edit input images given as URLs: fetched through a live gateway from a real local server, and the
SSRF refusals (private, loopback, link-local and metadata addresses, every redirect hop, http, size,
time, non-images), each a clean 400 before routing: no upstream call, no artifact."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from imagegate.router.errors import ApiError
from imagegate.router.fetch import Policy, Target, fetch_image_url, pinned
from tests.bad_input.support import EDITS, assert_error
from tests.conftest import UPSTREAM_KEY, Gateway, b64, base_config, decode, png_bytes, serve_gateway
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.server import FakeUpstream

RED = png_bytes(64, 64, (220, 10, 10))
BIG = 2 * 1024 * 1024  # over the 1 MB cap of the permissive gateway
PERMISSIVE = {"allow_http": True, "allow_private": True, "max_mb": 1, "timeout_s": 1.5}


class ImageServer(FakeUpstream):
    """A plain HTTP server with a PNG, redirects, a huge body, a slow body and a text body."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []  # (path, Host header)

        async def png(request: Request) -> Response:
            return Response(RED, media_type="image/png")

        async def redirect(request: Request) -> Response:
            return RedirectResponse(request.query_params["to"], status_code=302)

        async def loop(request: Request) -> Response:
            return RedirectResponse("/loop", status_code=302)

        async def huge(request: Request) -> Response:
            if "declared" in request.query_params:
                return Response(b"\0" * BIG, media_type="image/png")  # Content-Length says it
            return StreamingResponse((b"\0" * 65536 for _ in range(BIG // 65536)), media_type="image/png")

        async def slow(request: Request) -> Response:
            async def body() -> AsyncIterator[bytes]:
                yield RED[:100]
                await anyio.sleep(5)
                yield RED[100:]
            return StreamingResponse(body(), media_type="image/png")

        async def text(request: Request) -> Response:
            return Response(b"hello, not an image", media_type="image/png")

        def recorded(handler: Any) -> Any:
            async def endpoint(request: Request) -> Response:
                self.requests.append((request.url.path, request.headers.get("host", "")))
                return await handler(request)
            return endpoint

        handlers = {"/x.png": png, "/redirect": redirect, "/loop": loop, "/huge": huge, "/slow": slow, "/text": text}
        self.app = Starlette(routes=[Route(path, recorded(h)) for path, h in handlers.items()])


@pytest.fixture(scope="module")
def images() -> Iterator[ImageServer]:
    with ImageServer() as server:
        yield server


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(UPSTREAM_KEY) as fake:
        yield fake


def _gateway(tmp: Path, upstream: FakeOpenAI, inputs: dict[str, Any] | None) -> Gateway:
    cfg = base_config(tmp, upstream.base_url)
    if inputs is not None:
        cfg["inputs"] = inputs
    return serve_gateway(cfg)


@pytest.fixture(scope="module")
def default_gw(tmp_path_factory: pytest.TempPathFactory, upstream: FakeOpenAI) -> Iterator[Gateway]:
    with _gateway(tmp_path_factory.mktemp("url-default"), upstream, None) as gw:
        yield gw


@pytest.fixture(scope="module")
def open_gw(tmp_path_factory: pytest.TempPathFactory, upstream: FakeOpenAI) -> Iterator[Gateway]:
    with _gateway(tmp_path_factory.mktemp("url-open"), upstream, PERMISSIVE) as gw:
        yield gw


@pytest.fixture(autouse=True)
def _clean(upstream: FakeOpenAI, images: ImageServer) -> None:
    upstream.requests.clear()
    images.requests.clear()


def stored(gw: Gateway) -> set[str]:
    return {p.name for p in gw.state.artifacts.dir.rglob("art_*")}


def edit(gw: Gateway, image: Any, model: str = "demo") -> Any:
    return gw.http.post(EDITS, json={"model": model, "prompt": "x", "image": image, "seed": 5})


def refused(gw: Gateway, upstream: FakeOpenAI, image: Any, code: str, param: str = "image") -> str:
    """A 400 with `code` for the remote model; nothing reached the upstream, nothing was stored (the
    gateway is shared: earlier answers' images are artifacts, so what counts is what this one added)."""
    before = stored(gw)
    error = assert_error(edit(gw, image, model="remote"), 400, param, code)
    assert upstream.requests == [], "a refused URL reached the upstream"
    assert stored(gw) == before
    return str(error["message"])


# -- fetched -------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", [False, True], ids=["string", "image_url-object"])
def test_url_input_is_fetched_and_used(open_gw: Gateway, images: ImageServer, wrap: bool) -> None:
    url = f"{images.url}/x.png"
    resp = edit(open_gw, {"image_url": url} if wrap else url)
    assert resp.status_code == 200, resp.text
    same = edit(open_gw, b64(RED))  # the same image sent inline: the demo edit is deterministic
    other = edit(open_gw, b64(png_bytes(64, 64, (10, 10, 220))))
    got = decode(resp.json()["data"][0]["b64_json"]).tobytes()
    assert got == decode(same.json()["data"][0]["b64_json"]).tobytes()
    assert got != decode(other.json()["data"][0]["b64_json"]).tobytes()
    # The request went to the checked address, with the name (here 127.0.0.1:port) in Host.
    assert images.requests == [("/x.png", f"127.0.0.1:{images.port}")]


@pytest.mark.parametrize(("field", "value", "param"), [
    ("bogus_field", 1, "bogus_field"),  # unknown: the type check
    ("n", 99, "n"),  # over the model's max_n: a model rule
    ("size", "100x100", "size"),  # not a multiple of 16
    ("output_format", "gif", "output_format"),
])
def test_a_bad_field_is_refused_before_the_url_is_fetched(open_gw: Gateway, images: ImageServer, field: str,
                                                          value: Any, param: str) -> None:
    before = stored(open_gw)
    resp = open_gw.http.post(EDITS, json={"model": "demo", "prompt": "x", "image": f"{images.url}/x.png",
                                          field: value})
    assert_error(resp, 400, param)
    assert images.requests == [] and stored(open_gw) == before


def test_a_url_input_becomes_the_callers_artifact_once(open_gw: Gateway, images: ImageServer) -> None:
    first = edit(open_gw, f"{images.url}/x.png").json()
    again = edit(open_gw, f"{images.url}/x.png").json()
    [kept] = first["inputs"]
    assert again["inputs"] == [kept]  # the same bytes are stored once, under one id
    content = open_gw.http.get(f"/v1/artifacts/{kept['artifact_id']}/content")
    assert content.status_code == 200 and content.content == RED
    chained = edit(open_gw, first["data"][0]["artifact_id"])  # a result fed back by its id
    assert chained.status_code == 200 and chained.json()["inputs"] == [{"artifact_id": first["data"][0]["artifact_id"]}]


def test_name_is_resolved_and_pinned(open_gw: Gateway, images: ImageServer) -> None:
    """`localhost` is resolved by the gateway, the request goes to its address, the name stays in Host."""
    resp = edit(open_gw, f"http://localhost:{images.port}/x.png")
    assert resp.status_code == 200, resp.text
    assert images.requests == [("/x.png", f"localhost:{images.port}")]


def test_https_pin_keeps_the_name_for_tls() -> None:
    target = Target("https://images.example.com/a/b.png?x=1", "https", "images.example.com", 443,
                    (ipaddress.ip_address("2606:4700::1111"),))
    url, headers, extensions = pinned(target, target.addresses[0])
    assert url == "https://[2606:4700::1111]:443/a/b.png?x=1"
    assert headers["host"] == "images.example.com"
    assert extensions == {"sni_hostname": "images.example.com"}  # SNI and certificate check use the name


def test_redirect_is_followed_and_checked(open_gw: Gateway, images: ImageServer) -> None:
    resp = edit(open_gw, f"{images.url}/redirect?to=/x.png")
    assert resp.status_code == 200, resp.text
    assert [path for path, _ in images.requests] == ["/redirect", "/x.png"]


# -- refused by the address rules (default config) ----------------------------------------------


@pytest.mark.parametrize("url", [
    pytest.param("https://127.0.0.1/x.png", id="loopback"),
    pytest.param("https://169.254.169.254/latest/meta-data", id="metadata"),
    pytest.param("https://[::1]/x.png", id="ipv6-loopback"),
    pytest.param("https://[::ffff:127.0.0.1]/x.png", id="ipv4-mapped"),
    pytest.param("https://10.0.0.1/x.png", id="private-10"),
    pytest.param("https://192.168.1.1/x.png", id="private-192"),
    pytest.param("https://100.64.0.1/x.png", id="cgnat"),
    pytest.param("https://[fe80::1]/x.png", id="ipv6-link-local"),
    pytest.param("https://0.0.0.0/x.png", id="unspecified"),
    pytest.param("https://localhost/x.png", id="name-resolving-to-loopback"),
])
def test_non_public_address_is_refused(default_gw: Gateway, upstream: FakeOpenAI, url: str) -> None:
    refused(default_gw, upstream, url, "image_url_not_allowed")


def test_refusal_names_the_field(default_gw: Gateway, upstream: FakeOpenAI) -> None:
    body = {"model": "remote", "prompt": "x", "images": [b64(RED), {"image_url": "https://127.0.0.1/a.png"}]}
    assert_error(default_gw.http.post(EDITS, json=body), 400, "images[1]", "image_url_not_allowed")
    assert upstream.requests == []


def test_plain_http_is_refused_without_allow_http(default_gw: Gateway, upstream: FakeOpenAI,
                                                  images: ImageServer) -> None:
    message = refused(default_gw, upstream, f"{images.url}/x.png", "image_url_not_allowed")
    assert "https" in message
    assert images.requests == []


def test_url_fetch_off_keeps_the_old_answer(tmp_path: Path, upstream: FakeOpenAI, images: ImageServer) -> None:
    with _gateway(tmp_path, upstream, {**PERMISSIVE, "url_fetch": False}) as gw:
        refused(gw, upstream, f"{images.url}/x.png", "unsupported_image_url")
    assert images.requests == []


@pytest.mark.parametrize(("url", "code"), [
    pytest.param("https://user:pw@example.com/x.png", "invalid_image_url", id="credentials"),
    pytest.param("https:///x.png", "invalid_image_url", id="no-host"),
    pytest.param("https://example.com:99999/x.png", "invalid_image_url", id="bad-port"),
    pytest.param("https://no-such-host.invalid/x.png", "invalid_image_url", id="unresolvable"),
])
def test_malformed_url_is_refused(default_gw: Gateway, upstream: FakeOpenAI, url: str, code: str) -> None:
    refused(default_gw, upstream, url, code)


# -- refused while fetching (permissive config, a real local server) ------------------------------


@pytest.mark.parametrize(("path", "code"), [
    pytest.param("/redirect?to=http://169.254.169.254/latest/meta-data", "image_url_not_allowed",
                 id="redirect-to-metadata"),
    pytest.param("/redirect?to=http://[fe80::1]/x.png", "image_url_not_allowed", id="redirect-to-link-local"),
    pytest.param("/redirect?to=ftp://example.com/x.png", "image_url_not_allowed", id="redirect-to-ftp"),
    pytest.param("/loop", "invalid_image_url", id="too-many-redirects"),
    pytest.param("/huge", "image_url_too_large", id="huge-streamed"),
    pytest.param("/huge?declared=1", "image_url_too_large", id="huge-content-length"),
    pytest.param("/text", "invalid_image", id="not-an-image"),
    pytest.param("/missing", "image_url_fetch_failed", id="404"),
])
def test_fetch_refusals(open_gw: Gateway, upstream: FakeOpenAI, images: ImageServer, path: str, code: str) -> None:
    refused(open_gw, upstream, f"{images.url}{path}", code)


def test_slow_body_times_out(open_gw: Gateway, upstream: FakeOpenAI, images: ImageServer) -> None:
    started = time.monotonic()
    refused(open_gw, upstream, f"{images.url}/slow", "image_url_timeout")
    assert time.monotonic() - started < 4  # the 1.5 s deadline, not the server's 5 s pause


def test_hop_checker_allows_loopback_yet_refuses_metadata_redirect(images: ImageServer) -> None:
    """The seam: a policy that lets the first hop reach 127.0.0.1 still refuses 169.254.0.0/16."""
    policy = Policy(max_bytes=1 << 20, timeout_s=5, allow_http=True, allow_private=True)

    async def main() -> None:
        assert await fetch_image_url(f"{images.url}/x.png", "image", policy) == RED
        with pytest.raises(ApiError) as info:
            await fetch_image_url(f"{images.url}/redirect?to=http://169.254.169.254/latest/meta-data",
                                  "image", policy)
        assert (info.value.status, info.value.code, info.value.param) == (400, "image_url_not_allowed", "image")

    anyio.run(main)
    assert [path for path, _ in images.requests] == ["/x.png", "/redirect"]  # the metadata hop never sent
